"""Host cost of the exact-token attention that `cache/fused.py` merges into a layer's decode step in PyTorch
(`_with_exact`: sinks and recent tokens, joined with the codes' attention; a one-token step with a single exact
token and no padding, such as prefill_exact's own, joins it in `kernels.step.finish_step` instead, since
6b2aa53; until commit b1828cf `_attend_exact`, the exact part alone, with a merge after it), per
call, on this machine's CPU, one KV head at a time (EXACT_LOGITS = 0, how it ran before) against all heads
at once.

    PYTHONPATH=src python tools/research/exact_merge_overhead.py

A decode step calls it once per layer, so on a GPU, where each of these small ops is a kernel launch, the
difference is paid per layer per token.
"""

from __future__ import annotations

import time

import torch

from tqlab.cache import fused


def exact_inputs(batch: int, q_heads: int, kv_heads: int, tokens: int, dim: int):
    """What `_with_exact` takes in a decode step: the codes' output and log-sum-exp, `tokens` exact keys and
    values, all seen."""
    out, lse = torch.randn(batch, q_heads, 1, dim), torch.randn(batch, q_heads, 1)
    keys, values = (torch.randn(batch, kv_heads, tokens, dim) for _ in range(2))
    return out, lse, keys, values, torch.ones(batch, 1, tokens, dtype=torch.bool)


def per_call_us(inputs, query, reps: int = 300) -> float:
    out, lse, keys, values, seen = inputs
    for _ in range(20):
        fused._with_exact(out, lse, query, keys, values, seen, 0.125)
    begin = time.perf_counter()
    for _ in range(reps):
        fused._with_exact(out, lse, query, keys, values, seen, 0.125)
    return (time.perf_counter() - begin) / reps * 1e6


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; µs per call, one exact token (the step's own), head_dim 64")
    print("| batch | q/KV heads | one KV head at a time | all heads at once |\n| --- | --- | --- | --- |")
    for batch, q_heads, kv_heads in [(1, 32, 8), (8, 32, 8), (1, 12, 2), (8, 12, 2)]:
        inputs, query = exact_inputs(batch, q_heads, kv_heads, 1, 64), torch.randn(batch, q_heads, 1, 64)
        budget = fused.EXACT_LOGITS
        fused.EXACT_LOGITS = 0
        looped = per_call_us(inputs, query)
        fused.EXACT_LOGITS = budget
        print(f"| {batch} | {q_heads}/{kv_heads} | {looped:.0f} | {per_call_us(inputs, query):.0f} |")


if __name__ == "__main__":
    main()
