"""The library's fused quantize against another version of it, in one run on one GPU (same inputs, same timer):
how a quantize change was measured before it was kept.

    mkdir -p prev_quantize && for f in quantize packed; do git show 7cdcc7b:src/tqlab/kernels/$f.py > prev_quantize/$f.py; done
    PYTHONPATH=src python tools/research/gpu_quantize_ab.py --against prev_quantize
    PYTHONPATH=src python tools/research/gpu_quantize_ab.py --against prev_quantize --overflow
    PYTHONPATH=src python tools/research/gpu_quantize_ab.py --against prev_quantize --bits 4 --sign-magnitude

`--against` is a folder holding the other version's quantize.py and packed.py (the GPU machine has no git, so
the folder travels with the tree). Each version runs twice, alternating; prints % of a device copy of the same
bf16 input for both, per d and width, and the share of code bytes on which the two versions agree. With
`--overflow` this version is given a norm-overflow flag to set, as `TurboQuantCache` gives it; with
`--sign-magnitude` it writes 4-bit codes as sign-magnitude labels, as the cache has it do (compared with the
other version's codes after relabelling them back).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import triton
from gpu_decode_ab import load_kernels  # beside this script

from tqlab.kernels import quantize as this
from tqlab.kernels.packed import sign_magnitude
from tqlab.quant import TurboQuantMSE


def seconds(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, required=True)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--overflow", action="store_true", help="this version sets a norm-overflow flag")
    parser.add_argument("--sign-magnitude", action="store_true", help="this version writes 4-bit labels")
    args = parser.parse_args()
    other = load_kernels(args.against, "quantize")
    print("| d | bits | other % of copy | this % of copy | codes equal |")
    print("| --- | --- | --- | --- | --- |")
    for dim in args.dims:
        x = torch.randn(256 * 2**20 // (2 * dim), dim, device="cuda", dtype=torch.bfloat16)
        copy = torch.empty_like(x)
        copy_s = seconds(partial(copy.copy_, x))
        for bits in args.bits:
            codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard").cuda()
            matrix = codec.rotation.matrix()
            runs = {"other": [], "this": []}
            flag = torch.zeros(1, dtype=torch.int32, device="cuda")
            labels = args.sign_magnitude and bits == 4
            tables = {
                "other": other.quantize_tables(matrix, codec.boundaries, x.dtype),
                "this": this.quantize_tables(matrix, codec.boundaries, x.dtype, sign_magnitude=labels)
                if labels
                else this.quantize_tables(matrix, codec.boundaries, x.dtype),
            }
            for name, module in [("other", other), ("this", this)] * 2:
                kw = {"overflow": flag} if args.overflow and name == "this" else {}
                runs[name].append(
                    seconds(
                        partial(module.quantize_mse, x, matrix, codec.boundaries, tables=tables[name], **kw)
                    )
                )
            sample = x[: 1 << 16]
            ours = this.quantize_mse(sample, matrix, codec.boundaries, tables=tables["this"])[0]
            ours = sign_magnitude(ours) if labels else ours
            equal = (other.quantize_mse(sample, matrix, codec.boundaries)[0] == ours).float().mean()
            share = {
                name: " / ".join(f"{100 * copy_s / t:.1f}" for t in times) for name, times in runs.items()
            }
            print(
                f"| {dim} | {bits} | {share['other']} | {share['this']} | {100 * equal.item():.4f} % |",
                flush=True,
            )
        del x, copy


if __name__ == "__main__":
    main()
