"""quantize_prod's launch shape: rows per program, warps, and the rotation's output columns per step (each
step also multiplies the residual by Sᵀ[step columns, :], a [step, d] fp32 tile). Prints GB/s of bf16 input,
% of a device copy, and whether the index and sign bytes equal TurboQuantProd.quantize's, per configuration:

    PYTHONPATH=src python tools/research/gpu_prod_quantize_tuning.py [--dims 64 128 256]   # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import triton

import tqlab.kernels.quantize as kernel
from tqlab.kernels import quantize_prod, quantize_tables
from tqlab.quant import TurboQuantProd


def seconds(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    for dim in args.dims:
        x = torch.randn(128 * 2**20 // (2 * dim), dim, device="cuda", dtype=torch.bfloat16)
        copy_s = seconds(partial(torch.empty_like(x).copy_, x))
        codec = TurboQuantProd(dim, args.bits, rotation="fast_hadamard").cuda()
        mse, matrix = codec.mse, codec.rotation.matrix()
        tables = quantize_tables(matrix, mse.boundaries, x.dtype, codec.projection, mse.centroids)
        call = partial(
            quantize_prod, x, matrix, mse.boundaries, codec.projection, mse.centroids, tables=tables
        )
        sample = x[: 1 << 15]
        code = codec.quantize(sample)
        for rows, warps, step in itertools.product(args.rows, args.warps, args.steps):
            kernel.SKETCH_SHAPE, kernel.SKETCH_WARPS = {dim: (rows, step)}, warps
            name = f"d {dim} bits {args.bits} rows {rows} warps {warps} step {step}"
            try:
                ours = seconds(call)
            except Exception as exc:  # noqa: BLE001 — a shape that does not compile is a row that says so
                print(f"{name}: {type(exc).__name__}", flush=True)
                continue
            indices, signs, _, _ = quantize_prod(sample, *call.args[1:], tables=tables)
            print(
                f"{name}: {x.nbytes / ours / 1e9:.0f} GB/s, {100 * copy_s / ours:.1f}% of copy, bytes equal: "
                f"indices {100 * (indices == code.indices).float().mean().item():.4f}%, "
                f"signs {100 * (signs == code.signs).float().mean().item():.4f}%",
                flush=True,
            )
        del x


if __name__ == "__main__":
    main()
