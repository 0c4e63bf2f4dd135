"""Codec quality against theory (Stage 1 distortion, Stage 2 bias and variance) → docs/codec_quality.md.

    python benchmarks/codec_quality.py            # d = 128, 50 000 random unit vectors / pairs

Exact values come from the codebook and the coordinate density (no sampling); measured values from
random unit vectors through the real codecs (fp32 norms, so only the codebook and the sketch are measured).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from tqlab.quant import TurboQuantMSE, TurboQuantProd, coordinate_distortion

# Reference solves and the paper's variance constants (docs/theory.md)
REFERENCE_D = {1: 0.36089, 2: 0.11600, 3: 0.03397, 4: 0.00931}


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vectors", type=int, default=50_000)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/codec_quality.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    d, n = args.dim, args.vectors
    keys, queries = unit(n, d, 1), unit(n, d, 2)

    lines = [
        f"## Stage 1 (TurboQuantMSE), d = {d}: E‖u − û‖²",
        "",
        "| bits | exact (codebook) | reference solve | measured | measured / exact | lower bound 4^−b |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with torch.inference_mode():
        for bits in range(1, 9):
            exact = coordinate_distortion(d, bits)
            q = TurboQuantMSE(d, bits, norm_dtype=torch.float32)
            measured = ((q.dequantize(q.quantize(keys)) - keys) ** 2).sum(-1).mean().item()
            ref = REFERENCE_D.get(bits) if d == 128 else None
            lines.append(
                f"| {bits} | {exact:.5g} | {ref if ref else '—'} | {measured:.5g} | {measured / exact:.4f} "
                f"| {4.0**-bits:.3g} |"
            )
        lines += [
            "",
            f"## Stage 2 (TurboQuantProd), d = {d}, m = d: error of ⟨q, k⟩ over {n} independent unit pairs",
            "",
            "| bits | mean error | standard error | variance · d | theory (π/2)·D(b−1) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for bits in (2, 3, 4):
            p = TurboQuantProd(d, bits, norm_dtype=torch.float32)
            est = p.score(queries.unsqueeze(1), p.quantize(keys.unsqueeze(1))).reshape(-1).double()
            err = est - (queries.double() * keys.double()).sum(-1)
            theory = math.pi / 2 * coordinate_distortion(d, bits - 1)
            lines.append(
                f"| {bits} | {err.mean().item():.2e} | {err.std().item() / math.sqrt(n):.2e} "
                f"| {err.var().item() * d:.4f} | {theory:.4f} |"
            )
    text = "\n".join(lines)
    print(text)
    if str(args.out) != "-":
        header = f"# Codec quality against theory\n\n`python {' '.join(sys.argv)}`\n\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
