"""Where one decode step's time goes: the attention kernel, the merge of its chunks, and the rest of the
graph replay, per shape, with the chunks' length and the merge's shape varied.

    PYTHONPATH=src:benchmarks python tools/research/gpu_decode_breakdown.py --batches 1 --min-blocks 4 8 --merge-splits 128 512

Each row: chunks of at least --min-blocks blocks of keys (as many as fill the SMs' resident programs once, at
most), the merge reading --merge-dims output dimensions per program and --merge-splits chunks per step; the
step replayed from a CUDA graph with the L2 flushed before it (as benchmarks/gpu_decode.py times it; µs,
median of 30), then the device time of each kernel inside those replays, from the profiler.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import statistics

import torch
import triton
from gpu_decode import bench, decode_inputs

from tqlab.kernels import decode, decode_attention, decode_mma

SHAPES = [
    (1, 32, 8, 32768), (1, 32, 8, 65536), (1, 32, 8, 131072), (16, 32, 8, 32768),
    (1, 12, 2, 32768), (1, 12, 2, 65536), (1, 12, 2, 131072), (16, 12, 2, 32768),
]  # fmt: skip


def replay_times(fn, reps: int = 30) -> tuple[float, dict[str, float]]:
    """(median µs of a flushed replay, as gpu_decode.bench times it; median µs per kernel name inside the
    replays, from the profiler)."""
    fn()  # compiled before the profiler starts
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        total = bench(fn, reps)
    kernels = collections.defaultdict(list)
    for event in prof.events():
        if (
            event.device_type == torch.autograd.DeviceType.CUDA and "elementwise" not in event.name
        ):  # not the flush
            kernels[event.name[:40]].append(event.device_time)
    return total, {name: statistics.median(times) for name, times in kernels.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument(
        "--min-blocks",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="blocks per chunk at least (the library takes 4 or 8)",
    )
    parser.add_argument(
        "--merge-dims", type=int, nargs="+", default=[decode.MERGE_DIMS], help="output dims per merge program"
    )
    parser.add_argument("--merge-splits", type=int, nargs="+", default=[decode.MERGE_SPLITS])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| batch | heads | context | bits | least blocks: splits per head | merge dims, chunks per step | replay µs | kernels (µs) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    library = decode.MERGE_DIMS, decode.MERGE_SPLITS
    for batch, q_heads, kv_heads, context in [s for s in SHAPES if s[0] in args.batches]:
        for bits in args.bits:
            inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
            decode_attention(*inputs)  # fills decode's register-count cache
            launch = next(
                k
                for k in decode._RESIDENT
                if k[2] == bits and k[5] == q_heads // kv_heads and k[7] == kv_heads
            )
            resident = decode._RESIDENT[launch] * decode._sm_count(0)
            blocks = triton.cdiv(context, decode_mma.block_keys(inputs[0].shape[-1]))
            for least, merge in itertools.product(
                args.min_blocks, itertools.product(args.merge_dims, args.merge_splits)
            ):
                splits = max(1, min(resident // (batch * kv_heads), blocks // least))
                decode.MERGE_DIMS, decode.MERGE_SPLITS = merge
                total, kernels = replay_times(
                    lambda s=splits, i=inputs: decode_attention(*i, num_splits=s)[0]
                )
                parts = ", ".join(f"{name} {t:.1f}" for name, t in kernels.items())
                print(f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | {bits} | "
                      f"{least}: {splits} | {merge} | {total:.1f} | {parts} |", flush=True)  # fmt: skip

    decode.MERGE_DIMS, decode.MERGE_SPLITS = library


if __name__ == "__main__":
    main()
