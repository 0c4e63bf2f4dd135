"""Whether a decode step at batch 1 with few KV heads is bound by each program's chain of blocks or by the work
of all programs together: the library's step against steps whose two-warp programs take chunks of `--chunk-blocks`
blocks, each with and without the merge's launch (without it the output is not the attention: timing only), every
step replayed from a CUDA graph after an L2 flush as benchmarks/gpu_decode.py times it, the better of two.

    PYTHONPATH=src:benchmarks python tools/research/gpu_chunk_chain.py

Were each program's chain of dependent blocks the bound, shorter chunks over more programs would take less time
once the merge (whose partial results grow with the programs) is left out; and programs of four warps, each warp a
quarter of a block, would gain as much as chunks half as long over twice the programs of two warps.
"""

from __future__ import annotations

import argparse
import functools
from unittest import mock

from gpu_decode import bench, decode_inputs
from gpu_merge_ceiling import NoLaunch

from tqlab.kernels import decode, decode_attention, decode_mma


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--chunk-blocks", type=int, nargs="+", default=[4, 2, 1])
    parser.add_argument("--layout", default="12/2", help="query heads/KV heads")
    args = parser.parse_args()
    q_heads, kv_heads = map(int, args.layout.split("/"))
    shapes = [None, *args.chunk_blocks]
    print(
        "| context | bits | "
        + " | ".join("library" if c is None else f"{c}-block chunks, two warps" for c in shapes)
        + " |  (µs: step / without the merge)"
    )
    print("| --- | --- |" + " --- |" * len(shapes))
    for context in args.contexts:
        blocks = context // decode_mma.block_keys(128)
        for bits in args.bits:
            inputs, _ = decode_inputs(1, q_heads, kv_heads, context, bits)
            cells = []
            for chunk_blocks in shapes:
                launch = {} if chunk_blocks is None else {"num_splits": -(-blocks // chunk_blocks)}
                call = functools.partial(decode_attention, *inputs, **launch)
                with mock.patch.object(decode, "TWO_WARPS", "auto" if chunk_blocks is None else "always"):
                    step = min(bench(call) for _ in range(2))
                    with mock.patch.object(decode, "_merge_chunks", NoLaunch()):
                        alone = min(bench(call) for _ in range(2))
                cells.append(f"{step:.1f} / {alone:.1f}")
            print(f"| {context // 1024}k | K{bits}V{bits} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
