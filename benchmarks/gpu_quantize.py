"""Fused quantize throughput on a GPU: bf16 vectors in, packed TurboQuant-MSE codes and fp16 norms out.

    PYTHONPATH=src python benchmarks/gpu_quantize.py                   # → outputs/bench/benchmarks.md
    PYTHONPATH=src python benchmarks/gpu_quantize.py --out docs/benchmarks.md

GB/s counts the bf16 input read once; "% of copy" compares with a device-to-device copy of the same bytes
(which reads and writes them). The rotation is the fast-Hadamard codec's Π as a dense matrix. The codec's
PyTorch `quantize` on the same GPU is timed alongside, and its indices are compared with the kernel's.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import triton
from docs_section import write_gpu_section

from tqlab.kernels import quantize_mse, quantize_tables
from tqlab.kernels.packed import sign_magnitude
from tqlab.quant import TurboQuantMSE


def seconds(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--mib", type=int, default=256, help="bf16 input per call")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    rows = [
        "| d | bits | input MiB | Triton GB/s | % of copy | PyTorch codec GB/s | indices equal to codec |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(rows), flush=True)
    for dim in args.dims:
        x = torch.randn(args.mib * 2**20 // (2 * dim), dim, device="cuda", dtype=torch.bfloat16)
        copy = torch.empty_like(x)
        copy_s = seconds(partial(copy.copy_, x))
        for bits in args.bits:
            codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard").cuda()
            matrix = codec.rotation.matrix()
            # once per codec, as the cache does (4-bit codes as sign-magnitude labels)
            tables = quantize_tables(matrix, codec.boundaries, x.dtype, sign_magnitude=bits == 4)
            ours = seconds(partial(quantize_mse, x, matrix, codec.boundaries, tables=tables))
            sample = x[: 1 << 16]
            reference = seconds(partial(codec.quantize, sample)) * x.shape[0] / sample.shape[0]
            indices = quantize_mse(sample, matrix, codec.boundaries, tables=tables)[0]
            indices = sign_magnitude(indices) if bits == 4 else indices
            equal = (indices == codec.quantize(sample).indices).float().mean()
            rows.append(
                f"| {dim} | {bits} | {x.nbytes / 2**20:.0f} | {x.nbytes / ours / 1e9:.0f} | {100 * copy_s / ours:.0f}% | "
                f"{x.nbytes / reference / 1e9:.0f} | {100 * equal.item():.4f}% of bytes |"
            )
            print(rows[-1], flush=True)
        del x, copy
    write_gpu_section(
        args.out, "gpu_quantize", "Fused quantize on a GPU",
        "Median of triton do_bench; the codec is timed on 65536 rows and scaled.", rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
