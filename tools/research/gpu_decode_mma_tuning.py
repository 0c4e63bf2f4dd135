"""Launch shape of the register-fragment decode kernel (`kernels/decode_mma.py`) on a GPU: keys per step,
one-warp programs per SM that the split-K aims for (0: as many as the compiled kernel's registers let one
SM hold), the shortest chunk in blocks, and a register cap, each timed on the same inputs (CUDA-graph
replays, L2 flushed) against SDPA over a bf16 cache.

    PYTHONPATH=src python tools/research/gpu_decode_mma_tuning.py --block-keys 32 --min-blocks 4 8 16 \
        --programs-per-sm 0 24 --bits 3 4
    PYTHONPATH=src python tools/research/gpu_decode_mma_tuning.py --block-keys 32 16 --min-blocks 8 \
        --maxnreg 0 128 104
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import bench, bf16_times, decode_inputs  # noqa: E402

from tqlab.kernels import decode, decode_attention, decode_mma  # noqa: E402

CASES = [(1, 32, 8, 131072), (1, 12, 2, 131072), (1, 32, 8, 32768), (16, 32, 8, 32768), (16, 12, 2, 131072)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--block-keys", type=int, nargs="+", default=[16, 32])
    parser.add_argument(
        "--programs-per-sm", type=int, nargs="+", default=[0], help="0: as the registers allow"
    )
    parser.add_argument("--min-blocks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--maxnreg", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    resident = decode._resident_programs
    configs = list(itertools.product(args.block_keys, args.programs_per_sm, args.min_blocks, args.maxnreg))
    print(
        "| batch | q/KV | context | bits | SDPA µs | "
        + " | ".join(f"n{n} p{p} m{m} r{r}" for n, p, m, r in configs)
        + " |"
    )
    print("|" + " --- |" * (5 + len(configs)))
    for batch, q_heads, kv_heads, context in CASES:
        sdpa, _ = bf16_times(batch, q_heads, kv_heads, context, flex=False)
        for bits in args.bits:
            inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
            times = []
            for block_keys, programs, min_blocks, maxnreg in configs:
                decode_mma.block_keys = lambda dim, n=block_keys: n
                # both lengths: the library's rule is then "at least min_blocks, at most one wave"
                decode_mma.MIN_BLOCKS_PER_SPLIT = decode_mma.SHORT_BLOCKS_PER_SPLIT = min_blocks
                decode._RESIDENT.clear()
                decode._resident_programs = (
                    resident if not programs else lambda index, registers, p=programs: p
                )
                decode_mma.LAUNCH = dict(num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {}))
                times.append(bench(functools.partial(decode_attention, *inputs)))
            cells = " | ".join(f"{t:.1f} ({sdpa / t:.2f}×)" for t in times)
            print(
                f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | {bits} | {sdpa:.1f} | {cells} |",
                flush=True,
            )
            del inputs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
