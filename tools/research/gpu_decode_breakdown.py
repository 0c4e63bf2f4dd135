"""Where one decode step's time goes: the attention kernel, the merge of its chunks, and the rest of the
graph replay, per shape, with the chunks' length, the pair tables, the merge's shape and its launch varied.

    PYTHONPATH=src:benchmarks python tools/research/gpu_decode_breakdown.py --batches 1 --min-blocks 4 8 --merge-splits 128 512
    PYTHONPATH=src:benchmarks python tools/research/gpu_decode_breakdown.py --batches 1 --block-keys 32 64 --splits 128 256
    PYTHONPATH=src:benchmarks python tools/research/gpu_decode_breakdown.py --batches 1 --bits 4 --contexts 131072 --splits 512 --warps auto always --programmatic on off

Each row: chunks of at least --min-blocks blocks of keys (as many as fill the SMs' resident programs once, at
most; or --splits chunks per (sequence, KV head) asked of `decode_attention`, which makes chunks of
cdiv(blocks, splits) blocks: the row prints what it launched), pair tables from chunks of --lookup-min-blocks
blocks (`decode_mma.LOOKUP_MIN_BLOCKS`; then in launches of any size, not only nearly full waves), the merge
reading --merge-dims output dimensions per program and --merge-splits chunks per step, launched --programmatic
(`decode.PROGRAMMATIC_LAUNCH`) or not, --warps "auto" (`decode.TWO_WARPS`; this tool always passes num_splits,
so one warp per program) or "always" (two wherever `decode_mma.two_warps` takes the shape, whether or not they
fit one wave), the register kernel stepping over --block-keys keys per loop iteration
(`decode_mma.block_keys`: 32 at head_dim 128; the pair tables' thresholds scaled to the same keys per chunk);
the step replayed from a CUDA graph with the L2 flushed before it (as benchmarks/gpu_decode.py times it; µs,
median of 30), then the device time of each kernel inside those replays, from the profiler, and the largest
difference from the output of the library's own step on the same inputs, relative to the output's scale.
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
        # the flush, written (a fill) or read (a sum: a reduction, and the memset of its blocks' semaphores);
        # the decode step itself launches no memset
        flush = any(part in event.name for part in ("elementwise", "reduce_kernel", "Memset"))
        if event.device_type == torch.autograd.DeviceType.CUDA and not flush:
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
    parser.add_argument(
        "--contexts", type=int, nargs="+", help="keys per sequence (default: the shapes above)"
    )
    parser.add_argument(
        "--splits", type=int, nargs="+", help="chunks per (sequence, KV head), not --min-blocks"
    )
    parser.add_argument(
        "--lookup-min-blocks", type=int, nargs="+", help="for every width (default: the library's per width)"
    )
    parser.add_argument("--programmatic", choices=["on", "off"], nargs="+", default=["on"])
    parser.add_argument("--warps", choices=["auto", "always"], nargs="+", default=["auto"])
    parser.add_argument(
        "--block-keys", type=int, nargs="+", default=[0], help="keys per loop iteration (0: the library's)"
    )
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| batch | heads | context | bits | keys per block | chunks asked | blocks per chunk × chunks per head | "
        "lookup from blocks | merge dims, chunks per step | programmatic | two warps | replay µs | kernels (µs) | "
        "max rel Δ vs the library's step |"
    )
    print("| --- " * 14 + "|")
    library = (
        decode.MERGE_DIMS, decode.MERGE_SPLITS, decode_mma.LOOKUP_MIN_BLOCKS, decode.PROGRAMMATIC_LAUNCH,
        decode.TWO_WARPS,
    )  # fmt: skip
    block_keys, library_wave = decode_mma.block_keys, decode_mma.LOOKUP_MIN_WAVE
    shapes = [s for s in SHAPES if s[0] in args.batches]
    if args.contexts:
        shapes = list(dict.fromkeys((*s[:3], context) for s in shapes for context in args.contexts))

    def restore():
        (
            decode.MERGE_DIMS, decode.MERGE_SPLITS, decode_mma.LOOKUP_MIN_BLOCKS, decode.PROGRAMMATIC_LAUNCH,
            decode.TWO_WARPS,
        ) = library  # fmt: skip
        decode_mma.block_keys, decode_mma.LOOKUP_MIN_WAVE = block_keys, library_wave
        decode._RESIDENT.clear()

    for (batch, q_heads, kv_heads, context), bits in itertools.product(shapes, args.bits):
        restore()
        inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
        dim = inputs[0].shape[-1]
        reference = decode_attention(*inputs)[0]  # the library's kernel, to check each row's output against
        for keys in args.block_keys:
            keys = keys or block_keys(dim)
            decode_mma.block_keys = lambda dim, n=keys: n
            decode._RESIDENT.clear()  # its key does not hold the block's keys, which change the registers
            # the pair tables' thresholds count blocks: kept at the same keys per chunk
            tables = {b: max(1, m * block_keys(dim) // keys) for b, m in library[2].items()}
            decode_mma.LOOKUP_MIN_BLOCKS = tables
            decode_attention(*inputs)  # fills decode's register-count cache
            launch = next(
                k
                for k in decode._RESIDENT
                if k[2] == bits and k[5] == q_heads // kv_heads and k[7] == kv_heads
            )
            resident = decode._RESIDENT[launch] * decode._sm_count(0)
            blocks = triton.cdiv(context, keys)
            chunkings = (  # (what was asked, num_splits)
                [(f"{s}", s) for s in args.splits]
                if args.splits
                else [
                    (f"≥ {m} blocks", max(1, min(resident // (batch * kv_heads), blocks // m)))
                    for m in args.min_blocks
                ]
            )
            for (asked, splits), lookup, merge, programmatic, warps in itertools.product(
                chunkings,
                args.lookup_min_blocks or [None],
                itertools.product(args.merge_dims, args.merge_splits),
                args.programmatic,
                args.warps,
            ):
                decode.TWO_WARPS = warps
                decode.MERGE_DIMS, decode.MERGE_SPLITS = merge
                decode_mma.LOOKUP_MIN_BLOCKS = tables if lookup is None else dict.fromkeys(tables, lookup)
                decode_mma.LOOKUP_MIN_WAVE = library_wave if lookup is None else 0
                decode.PROGRAMMATIC_LAUNCH = programmatic == "on"
                step = lambda s=splits, i=inputs: decode_attention(*i, num_splits=s)[0]  # noqa: E731
                delta = ((step() - reference).abs().max() / reference.abs().max()).item()
                total, kernels = replay_times(step)
                parts = ", ".join(f"{name} {t:.1f}" for name, t in kernels.items())
                chunk = triton.cdiv(blocks, splits)  # as decode_attention splits them
                print(f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | {bits} | {keys} | {asked} | "
                      f"{chunk} × {triton.cdiv(blocks, chunk)} | "
                      f"{tables.get(bits, '-') if lookup is None else lookup} | {merge} | {programmatic} | {warps} | {total:.1f} | "
                      f"{parts} | {delta:.0e} |", flush=True)  # fmt: skip

    restore()


if __name__ == "__main__":
    main()
