"""The most a decode step could gain from merging its chunks inside the attention kernel (a step of one
launch): the library's step against the same step with the merge's launch left out — its output is then
not the attention (timing only) — each replayed from a CUDA graph after an L2 flush as
benchmarks/gpu_decode.py times it, beside SDPA over a bf16 cache of the same shape.

    PYTHONPATH=src:benchmarks python tools/research/gpu_merge_ceiling.py

An attention kernel that merged its own chunks would still read every chunk's partial result after the last
one was written, so the step without a merge is a lower bound on such a step's time, and its ratio to SDPA
an upper bound on what a one-launch step built around this attention kernel can reach.
"""

from __future__ import annotations

import argparse
from unittest import mock

from gpu_decode import bench, bf16_times, decode_inputs

from tqlab.kernels import decode, decode_attention

SHAPES = [(1, 12, 2, 32768), (1, 12, 2, 65536), (1, 12, 2, 131072), (1, 32, 8, 32768), (16, 12, 2, 32768)]


class NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    args = parser.parse_args()
    print("| batch | q/KV heads | context | bits | SDPA bf16 µs | step µs | step without the merge µs | "
          "step vs SDPA | without the merge vs SDPA |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, q_heads, kv_heads, context in SHAPES:
        sdpa, _ = bf16_times(batch, q_heads, kv_heads, context)
        for bits in args.bits:
            inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
            step = bench(lambda: decode_attention(*inputs))  # noqa: B023 (timed before the loop moves on)
            with mock.patch.object(decode, "_merge_chunks", NoLaunch()):
                alone = bench(lambda: decode_attention(*inputs))  # noqa: B023
            print(
                f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | K{bits}V{bits} | {sdpa:.1f} | "
                f"{step:.1f} | {alone:.1f} | {sdpa / step:.2f}× | {sdpa / alone:.2f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
