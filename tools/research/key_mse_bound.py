"""Key MSE against the Gaussian transform-coding bound, per (layer, KV head), on held-out keys.

    .venv/bin/python tools/research/key_mse_bound.py captures/<smollm2 capture> --sequences 16

For each unit: train-split statistics from the first --sequences train sequences (mean, covariance); the bound
is reverse water-filling on the covariance eigenvalues at the codec's stored bits per vector (payload and
norm: the same bytes), as a share of the test keys' energy (the mean is a per-head constant, stored once).
Measured on every test sequence: Σ‖k − k̂‖² / Σ‖k‖² for fast-Hadamard TurboQuant (seeds 0–2), the same
around the train mean, eigenbasis × Hadamard, and transform coding around the mean. Prints a markdown table of
medians over units and the share of the Hadamard-to-bound gap each closes, with a Wilcoxon test over units.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from scipy import stats

from tqlab.capture.store import CaptureStore
from tqlab.kv import KVQuantSpec
from tqlab.kv.builder import CodecBank
from tqlab.quant.gaussian import water_filling_bound

CONFIGS = {
    "fast Hadamard": ("turboquant_mse", "fast_hadamard", {}),
    "fast Hadamard, centred": ("turboquant_mse", "fast_hadamard", {"center": True}),
    "eigenbasis × Hadamard, centred": ("turboquant_mse", "eigen_hadamard", {"center": True}),
    "transform coding, centred": ("transform_coding", "identity", {"center": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("capture")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    store = CaptureStore(args.capture, verify=False)
    heads, d = store.architecture["num_kv_heads"], store.architecture["head_dim"]
    train = {
        (layer, h): torch.cat([store.load("train", layer, s, h)["k"] for s in range(args.sequences)]).float()
        for layer in store.layers
        for h in range(heads)
    }
    calibration = lambda side, layer, head: train[(layer, head)]  # noqa: E731 - keys only
    test = {
        unit: torch.cat(
            [store.load("test", unit[0], s, unit[1])["k"] for s in range(store.num_sequences("test"))]
        ).float()
        for unit in train
    }
    print(
        f"Key MSE (share of test-key energy), {len(train)} units (layer, KV head), head_dim {d}; medians over units.\n"
    )
    print("| bits | stored bits | Gaussian bound | " + " | ".join(CONFIGS) + " |")
    print("|---" * (3 + len(CONFIGS)) + "|")
    gaps = []
    for bits in args.bits:
        total = bits * d + 16  # payload + one fp16 norm per vector: what every codec below stores
        bound = {}
        for unit, keys in train.items():
            centred = keys.double() - keys.double().mean(0)
            evals = torch.linalg.eigvalsh(centred.T @ centred / len(centred)).clamp_min(0).numpy()
            bound[unit] = water_filling_bound(evals, total) / test[unit].double().pow(2).sum(-1).mean().item()
        errors = {}
        for name, (codec, rotation, options) in CONFIGS.items():
            seeds = args.seeds if codec == "turboquant_mse" else [0]  # transform coding has no randomness
            per_unit = {unit: [] for unit in train}
            for seed in seeds:
                spec = KVQuantSpec.create(
                    codec, bits, rotation, compress=("key",), codec_options=options, seed=seed
                )
                bank = CodecBank(spec, d, calibration)
                for unit, keys in test.items():
                    c = bank.get("key", *unit, "cpu")
                    err = (c.dequantize(c.quantize(keys)) - keys).double().pow(2).sum() / keys.double().pow(
                        2
                    ).sum()
                    per_unit[unit].append(err.item())
            errors[name] = {unit: statistics.mean(v) for unit, v in per_unit.items()}
        row = [statistics.median(errors[n].values()) for n in CONFIGS]
        print(
            f"| {bits} | {total / d:.3f} | {statistics.median(bound.values()):.4f} | "
            + " | ".join(f"{v:.4f}" for v in row)
            + " |"
        )
        hadamard = errors["fast Hadamard"]
        for name in list(CONFIGS)[1:]:
            closed = [(hadamard[u] - errors[name][u]) / (hadamard[u] - bound[u]) for u in train]
            mine = [errors[name][u] for u in train]
            p = stats.wilcoxon(mine, [hadamard[u] for u in train]).pvalue
            centred = [errors["fast Hadamard, centred"][u] for u in train]
            p_centred = (
                stats.wilcoxon(mine, centred).pvalue if name != "fast Hadamard, centred" else float("nan")
            )
            better = float(np.mean([errors[name][u] < hadamard[u] for u in train]))
            gaps.append(
                (
                    bits,
                    name,
                    statistics.median(closed),
                    better,
                    p,
                    statistics.median(mine) / statistics.median(centred),
                    p_centred,
                )
            )
    print(
        "\nShare of the gap between fast Hadamard and the bound that each closes (median over units), the share of"
    )
    print(
        "units where it beats fast Hadamard, the Wilcoxon signed-rank p-value over units (paired), and the same"
    )
    print("against fast Hadamard around the same mean (median MSE ratio, p):\n")
    print("| bits | configuration | gap closed | units better | p | vs centred Hadamard | p |")
    print("|---|---|---|---|---|---|---|")
    for bits, name, closed, better, p, ratio, p_centred in gaps:
        print(f"| {bits} | {name} | {closed:.0%} | {better:.0%} | {p:.2g} | {ratio:.3f}× | {p_centred:.2g} |")


if __name__ == "__main__":
    main()
