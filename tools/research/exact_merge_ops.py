"""ATen ops of one layer's merge of the codes' attention with its exact tokens in an eager decode step that
takes the PyTorch merge (`tqlab.cache.fused._with_exact`: a left-padded batch; without padding, one exact
token joins in `kernels.step.finish_step`), counted with torch.profiler on the CPU: each op is a kernel launch
or more on a GPU, where an eager step's time is mostly such host work. Shape: Qwen2.5-Coder-1.5B's (12/2
heads, d = 128), one query token, one exact token (prefill_exact's own) marked seen.

    PYTHONPATH=src python tools/research/exact_merge_ops.py [--against old/fused.py]

`--against` counts an older version's `_merge(out, lse, *_attend_exact(...))` (up to commit d7218d2: `git show
d7218d2:src/tqlab/cache/fused.py > old/fused.py`) on the same inputs, and prints the largest difference between
the two outputs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tqlab.cache import fused


def top_level_ops(fn) -> tuple[torch.Tensor, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = fn()
    return result, sum(e.name.startswith("aten::") and e.cpu_parent is None for e in profile.events())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", help="another version's fused.py")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, dim, exact = 1, 12, 2, 128, 1
    query = torch.randn(batch, q_heads, 1, dim, generator=g).bfloat16()
    out, lse = torch.randn(batch, q_heads, 1, dim, generator=g), torch.randn(batch, q_heads, 1, generator=g)
    keys, values = torch.randn(2, batch, kv_heads, exact, dim, generator=g).bfloat16()
    seen = torch.ones(batch, 1, exact, dtype=torch.bool)
    scaling = dim**-0.5
    merged, ops = top_level_ops(lambda: fused._with_exact(out, lse, query, keys, values, seen, scaling))
    print(f"_with_exact: {ops} top-level ATen ops")
    if args.against:
        source = open(args.against).read().replace("from .packed import", "from tqlab.cache.packed import")
        other = type(sys)("other_fused")
        exec(compile(source, args.against, "exec"), other.__dict__)
        before, other_ops = top_level_ops(
            lambda: other._merge(out, lse, *other._attend_exact(query, keys, values, seen, scaling))[0]
        )
        print(f"{args.against}: {other_ops} top-level ATen ops; max |Δ| {(merged - before).abs().max():.1e}")


if __name__ == "__main__":
    main()
