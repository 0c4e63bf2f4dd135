"""A frozen decode step's two ends, fused (`kernels.step.rotate_queries`, `finish_step`) against PyTorch's ops
(`cache.fused._rotate` of the fp32 query; `_rotate_back` then `with_one_exact`, below, the library's join
until 6b2aa53), each replayed from a CUDA graph after an L2 flush (µs, median).

    PYTHONPATH=src:benchmarks python tools/research/gpu_step_ends_ab.py
"""

from __future__ import annotations

import torch
from gpu_decode import bench

from tqlab.cache.fused import _rotate, _rotate_back
from tqlab.kernels.step import finish_step, rotate_queries


def with_one_exact(out, lse, query, keys, values, scaling: float) -> torch.Tensor:
    """One exact key every query sees joined in PyTorch: a sigmoid of its logit against the codes' log-sum-exp,
    and a lerp (`cache.fused._with_one_exact` until 6b2aa53, which `finish_step` replaced)."""
    batch, q_heads, q_len, dim = query.shape
    rows = (batch, keys.shape[1], -1)  # [B, KVH, G·Tq, ...]: a KV head's query rows, head-major
    logit = query.float().reshape(*rows, dim) @ keys.float().transpose(-1, -2)  # [B, KVH, G·Tq, 1]
    weight = torch.sigmoid(logit * scaling - lse.reshape(*rows, 1))
    mixed = torch.lerp(out.reshape(*rows, dim), values.float(), weight)
    return mixed.reshape(batch, q_heads, q_len, dim)


def compare(batch: int, q_heads: int, kv_heads: int, dim: int) -> None:
    out = torch.randn(batch, q_heads, 1, dim, device="cuda")
    lse = torch.randn(batch, q_heads, 1, device="cuda")
    query = torch.randn(batch, q_heads, 1, dim, device="cuda").bfloat16()
    keys, values = (torch.randn(batch, kv_heads, 1, dim, device="cuda").bfloat16() for _ in "kv")
    rotations = torch.linalg.qr(torch.randn(kv_heads, dim, dim, device="cuda"))[0]
    scaling = dim**-0.5
    ends = {
        "query in": (lambda: _rotate(query.float(), rotations), lambda: rotate_queries(query, rotations)),
        "back + own token": (
            lambda: with_one_exact(_rotate_back(out, rotations), lse, query.float(), keys, values, scaling),
            lambda: finish_step(out, lse, rotations, query, keys, values, scaling),
        ),
    }
    for end, (torch_path, fused) in ends.items():
        delta = (torch_path() - fused()).abs().max().item()
        print(
            f"| {batch} | {q_heads}/{kv_heads} | {dim} | {end} | {bench(torch_path):.1f} | {bench(fused):.1f} "
            f"| {delta:.1e} |"
        )


print("| batch | q/KV heads | d | end | PyTorch µs | fused µs | max abs Δ |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for shape in [(1, 12, 2, 128), (8, 12, 2, 128), (1, 32, 8, 64), (8, 32, 8, 64)]:
    compare(*shape)
