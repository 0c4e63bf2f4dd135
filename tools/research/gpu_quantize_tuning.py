"""The fused quantize's launch shape at d = 256 (rows per program, warps, output columns per ±1 product, and
the signed-halves form's output columns per step, or None for the whole 256 × 256 product instead of two
128-wide ones): each program
re-reads the sign matrix from L2 for every BLOCK_ROWS rows, so at d = 256 that read is four times the rows' own
bytes at the default 64 rows (twice with halves). Prints GB/s, % of a device copy and whether the indices equal
the codec's, per configuration, in one run:

    PYTHONPATH=src python tools/research/gpu_quantize_tuning.py        # on a CUDA GPU
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import partial

import torch
import triton

import tqlab.kernels.quantize as kernel
from tqlab.kernels import quantize_mse, quantize_tables
from tqlab.quant import TurboQuantMSE

CONFIGS = [  # rows, warps, tile, halves: None (the whole product) or output columns per step of each half
    (64, 4, 128, None), (64, 4, 128, 128), (64, 4, 128, 64), (64, 4, 128, 32), (64, 8, 128, 64),
    (128, 8, 128, 64), (128, 4, 128, 32), (32, 4, 128, 64),
]  # fmt: skip


def seconds(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def main() -> None:
    dim = 256
    x = torch.randn(256 * 2**20 // (2 * dim), dim, device="cuda", dtype=torch.bfloat16)
    copy = torch.empty_like(x)
    copy_s = seconds(partial(copy.copy_, x))
    print(f"d = {dim}, {x.nbytes / 2**20:.0f} MiB bf16; copy {x.nbytes / copy_s / 1e9:.0f} GB/s")
    for bits, (rows, warps, tile, halves) in itertools.product([2, 3, 4], CONFIGS):
        kernel.BLOCK_ROWS, kernel.SIGN_WARPS, kernel.SIGN_TILE = rows, warps, tile
        kernel.HALVES_TILE = halves or tile
        codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard").cuda()
        matrix = codec.rotation.matrix()
        tables = quantize_tables(matrix, codec.boundaries, x.dtype)
        if halves is None:
            tables = dataclasses.replace(tables, row_signs=None)
        name = f"bits {bits} rows {rows} warps {warps} tile {tile} halves {halves}"
        try:
            ours = seconds(partial(quantize_mse, x, matrix, codec.boundaries, tables=tables))
        except Exception as exc:  # noqa: BLE001 — a shape that does not compile is a row that says so
            print(f"{name}: {type(exc).__name__}")
            continue
        sample = x[: 1 << 16]
        equal = (
            quantize_mse(sample, matrix, codec.boundaries, tables=tables)[0] == codec.quantize(sample).indices
        )
        print(f"{name}: {x.nbytes / ours / 1e9:.0f} GB/s, "
              f"{100 * copy_s / ours:.0f}% of copy, indices equal on {100 * equal.float().mean().item():.4f}% of bytes",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
