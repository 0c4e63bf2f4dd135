"""Chunk length against program width for the register-fragment decode kernel on a GPU: each case timed with
the library's own launch shape, then with every chunk of `--chunk-blocks` blocks on programs of one warp and
of two (CUDA-graph replays, L2 flushed), beside SDPA over a bf16 cache.

    PYTHONPATH=src python tools/research/gpu_decode_chunk_sweep.py --bits 3 2 4 --chunk-blocks 1 2 3 4
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import bench, bf16_times, decode_inputs  # noqa: E402

from tqlab.kernels import decode, decode_attention, decode_mma  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--chunk-blocks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--layouts", nargs="+", default=["12/2"], help="query heads/KV heads")
    args = parser.parse_args()
    # with num_splits given, "auto" launches one warp (two only for chunks it chose short itself)
    shapes = [(c, w) for c in args.chunk_blocks for w in ("auto", "always")]
    print(
        "| batch | q/KV | context | bits | SDPA µs | library µs | "
        + " | ".join(f"{c} blk {1 if w == 'auto' else 2} warp" for c, w in shapes)
        + " |"
    )
    print("|" + " --- |" * (6 + len(shapes)))
    for layout in args.layouts:
        q_heads, kv_heads = map(int, layout.split("/"))
        for batch in args.batches:
            for context in args.contexts:
                sdpa, _ = bf16_times(batch, q_heads, kv_heads, context, flex=False)
                blocks = context // decode_mma.block_keys(128)
                for bits in args.bits:
                    inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
                    decode.TWO_WARPS = "auto"
                    reference = decode_attention(*inputs)[0]
                    times = [bench(functools.partial(decode_attention, *inputs))]
                    for chunk_blocks, warps in shapes:
                        decode.TWO_WARPS = warps
                        call = functools.partial(decode_attention, *inputs, num_splits=blocks // chunk_blocks)
                        got = call()[0]
                        assert (got - reference).abs().max() <= 5e-3 * reference.abs().max(), (
                            chunk_blocks,
                            warps,
                        )
                        times.append(bench(call))
                    decode.TWO_WARPS = "auto"
                    print(
                        f"| {batch} | {layout} | {context // 1024}k | K{bits}V{bits} | {sdpa:.1f} | "
                        + " | ".join(f"{t:.1f}" for t in times)
                        + " |",
                        flush=True,
                    )
                    del inputs
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
