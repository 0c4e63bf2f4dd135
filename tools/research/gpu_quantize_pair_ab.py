"""A frozen decode step's start — its key and value quantize, written into a cache-like store at a device-side
count as `TurboQuantLayer._update_static` writes them, and its queries' rotation (`kernels.step.rotate_queries`,
GQA 6) — in three launches, in two (the quantize paired, `kernels.quantize.run_together`) and in one (the
rotation on a third plane), each replayed from a CUDA graph after an L2 flush (µs, median); the stores and
rotated queries compared byte for byte.

    PYTHONPATH=src:benchmarks python tools/research/gpu_quantize_pair_ab.py
"""

from __future__ import annotations

import torch
from gpu_decode import bench

from tqlab.kernels import quantize_mse
from tqlab.kernels.quantize import quantize_tables, run_together
from tqlab.kernels.step import rotate_queries
from tqlab.quant import TurboQuantMSE

CAPACITY = 4096


def side(batch: int, kv_heads: int, dim: int, bits: int, seed: int):
    codecs = [TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=seed + h) for h in range(kv_heads)]
    rotation = torch.stack([c.rotation.matrix() for c in codecs]).cuda()
    x = torch.randn(batch, kv_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    boundaries = codecs[0].boundaries.cuda()
    stores = [
        (
            torch.zeros(batch, kv_heads, CAPACITY, dim // 8 * bits, dtype=torch.uint8, device="cuda"),
            torch.zeros(batch, kv_heads, CAPACITY, dtype=torch.float16, device="cuda"),
        )
        for _ in range(2)
    ]
    return x, rotation, quantize_tables(rotation, boundaries, x.dtype), stores


def compare(batch: int, kv_heads: int, dim: int, bits: int) -> None:
    at = torch.tensor(CAPACITY // 2, device="cuda")
    flags = torch.zeros(2, 1, dtype=torch.int32, device="cuda")
    sides = [side(batch, kv_heads, dim, bits, seed) for seed in (10, 20)]

    def calls(store: int, launch: bool):
        return [
            quantize_mse(
                x,
                rotation,
                tables.boundaries,
                tables=tables,
                into=stores[store],
                at=at,
                overflow=flags[i],
                launch=launch,
            )
            for i, (x, rotation, tables, stores) in enumerate(sides)
        ]

    query = torch.randn(batch, 6 * kv_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    rotations = sides[0][1]
    three = bench(lambda: (calls(0, True), rotate_queries(query, rotations)))
    two = bench(lambda: (run_together(*calls(1, False)), rotate_queries(query, rotations)))
    for _, _, _, stores in sides:  # what "one" writes, compared below, not what "two" left
        for tensor in stores[1]:
            tensor.zero_()
    one = bench(lambda: run_together(*calls(1, False), query=query, rotations=rotations))
    same = all(torch.equal(a, b) for _, _, _, stores in sides for a, b in zip(*stores, strict=True))
    same = same and torch.equal(
        run_together(*calls(1, False), query=query, rotations=rotations)[1], rotate_queries(query, rotations)
    )
    print(f"| {batch} | {kv_heads} | {dim} | {bits} | {three:.1f} | {two:.1f} | {one:.1f} | {same} |")


print("| batch | KV heads | d | bits | three launches µs | two µs | one µs | outputs equal |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for shape in [(1, 2, 128, 4), (1, 2, 128, 3), (8, 2, 128, 4), (1, 8, 64, 4), (8, 8, 64, 3), (16, 8, 128, 4)]:
    compare(*shape)
