"""Per-layer triality-view selection (the seed's study, done honestly): fitted on train, chosen on validation,
reported on test. The candidates are learned_data_aware.sh's fits (SmolLM2 keys at 2 bits around the per-head
mean; SO(8) blocks after eigenbasis × Hadamard in each view; 3 seeds).

    .venv/bin/python tools/research/triality_selection.py captures/smollm2-135m-ca5dc1531e01 \
        multirun/learned_data_aware/train_triality --out outputs/research/triality_selection

Writes <out>/seed<s>/best.safetensors (eval.py rotations=<out>/seed<s>) and prints, per seed, how many layers
chose each view and each candidate's mean validation output cosine. With --control the same selection runs between
two fits of one view (vector, seeds s and s + 1), so that picking the better of two fits per layer is not read as a
gain from the views.
"""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from pathlib import Path

import torch

from tqlab.capture.store import CaptureStore
from tqlab.fit.select import merge_per_layer, select_per_layer
from tqlab.kv.spec import FittedRotations


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("capture")
    parser.add_argument("fits", type=Path, help="a train multirun folder: jobs 0.. with result/best.safetensors")
    parser.add_argument("--out", type=Path, default=Path("outputs/research/triality_selection"))
    parser.add_argument("--control", action="store_true", help="choose between two vector fits instead")
    args = parser.parse_args()
    store = CaptureStore(args.capture, verify=False)
    train_sequences = store.num_sequences("train")

    @functools.lru_cache(maxsize=None)
    def keys(layer: int, head: int) -> torch.Tensor:  # the means train.py fitted around: every train sequence
        return torch.cat([store.load("train", layer, s, head)["k"] for s in range(train_sequences)])

    calibration = lambda side, layer, head: keys(layer, head)  # noqa: E731 - keys only
    by_seed: dict[int, dict[str, Path]] = {}
    for job in sorted(p for p in args.fits.iterdir() if (p / "result" / "best.safetensors").is_file()):
        path = job / "result" / "best.safetensors"
        fitted = FittedRotations.read(path)
        by_seed.setdefault(fitted.seed, {})[fitted.facts["rotation_options"]["view"]] = path
    if args.control:
        control(by_seed, store, calibration, args.out)
        return
    print("| seed | layers choosing vector / spinor_plus / spinor_minus | validation output cosine: vector | spinor_plus | spinor_minus | selected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, candidates in sorted(by_seed.items()):
        choice, scores = select_per_layer(candidates, store, calibration)
        out = merge_per_layer(choice, candidates, args.out / f"seed{seed}" / "best.safetensors")
        counts = Counter(choice.values())
        mean = {view: sum(s.values()) / len(s) for view, s in scores.items()}
        selected = sum(scores[view][layer] for layer, view in choice.items()) / len(choice)
        views = ("vector", "spinor_plus", "spinor_minus")
        print(
            f"| {seed} | {' / '.join(str(counts.get(v, 0)) for v in views)} | "
            + " | ".join(f"{mean[v]:.5f}" for v in views)
            + f" | {selected:.5f} |",
            flush=True,
        )
        print(f"wrote {out}", flush=True)


def control(by_seed: dict, store, calibration, out: Path) -> None:
    seeds = sorted(by_seed)
    for i, seed in enumerate(seeds):
        other = seeds[(i + 1) % len(seeds)]
        candidates = {f"seed{seed}": by_seed[seed]["vector"], f"seed{other}": by_seed[other]["vector"]}
        choice, _ = select_per_layer(candidates, store, calibration)
        path = merge_per_layer(choice, candidates, out / f"seed{seed}" / "best.safetensors", "best_of_two_seeds")
        kept = sum(v == f"seed{seed}" for v in choice.values())
        print(f"seed {seed} vs {other}: {kept} layers keep seed {seed}; wrote {path}", flush=True)


if __name__ == "__main__":
    main()
