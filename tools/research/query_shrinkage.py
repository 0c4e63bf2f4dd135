"""Choose the query metric's shrinkage α on the validation split (never the test split).

    .venv/bin/python tools/research/query_shrinkage.py captures/<smollm2 capture> --split validation

Keys of every third layer, every KV head: 2-bit fast-Hadamard TurboQuant around the head's train mean, coded
plain or in the metric of Σ_q + α·tr(Σ_q)/d·I (Σ_q from 2 train sequences of the head's real queries).
Prints, per configuration, the mean over blocks of the held-out causal logit MSE, the attention-output
cosine (values exact) and the attention KL.
"""

from __future__ import annotations

import argparse

import torch

from tqlab.capture.store import CaptureStore
from tqlab.metrics.attention import causal_mask, per_query_metrics
from tqlab.quant import Centered, QueryWeighted, TurboQuantMSE, query_metric_maps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("capture")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0, 0.3, 1, 3, 10, 30, 100])
    args = parser.parse_args()
    store = CaptureStore(args.capture, verify=False)
    heads, d = store.architecture["num_kv_heads"], store.architecture["head_dim"]
    configs = ["centered", *(f"α={a:g}" for a in args.alphas)]
    sums = {c: torch.zeros(3, dtype=torch.float64) for c in configs}
    blocks = 0
    for layer in store.layers[::3]:
        for h in range(heads):
            train = [store.load("train", layer, s, h) for s in range(2)]
            keys = torch.cat([t["k"] for t in train])
            queries = torch.cat([t["q"].flatten(0, -2) for t in train])
            codecs = {
                "centered": Centered(TurboQuantMSE(d, args.bits, "fast_hadamard", seed=layer), keys.mean(0))
            }
            for a in args.alphas:
                inner = TurboQuantMSE(d, args.bits, "fast_hadamard", seed=layer)
                codecs[f"α={a:g}"] = Centered(
                    QueryWeighted(inner, *query_metric_maps(queries, a)), keys.mean(0)
                )
            for s in range(args.sequences):
                block = store.load(args.split, layer, s, h)
                q, k, v = block["q"], block["k"], block["v"]
                exact = q.double() @ k.double().T * d**-0.5
                mask = causal_mask(exact.shape[-2], exact.shape[-1])
                for name, codec in codecs.items():
                    approx = codec.score(q, codec.quantize(k)).double() * d**-0.5
                    m = per_query_metrics(exact, approx, v, v)
                    sums[name] += torch.tensor(
                        [
                            float(((exact - approx) ** 2).masked_select(mask).mean()),
                            float(m["output_cosine"].nanmean()),
                            float(m["attention_kl"].nanmean()),
                        ],
                        dtype=torch.float64,
                    )
                blocks += 1
    print(f"{args.split} split, {args.bits}-bit keys, {blocks} blocks (layer, head, sequence)")
    print("| keys coded | logit MSE | output cosine | attention KL |\n| --- | --- | --- | --- |")
    for name, total in sums.items():
        mse, cos, kl = (total / blocks).tolist()
        print(f"| {name} | {mse:.4f} | {cos:.4f} | {kl:.4f} |")


if __name__ == "__main__":
    main()
