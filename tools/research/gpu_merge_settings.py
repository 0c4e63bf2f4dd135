"""The merge kernel's own settings at the shapes where the merge is a large share of a decode step: every pair
of output dimensions per merge program (`decode.MERGE_DIMS`) and warps per merge program, each step replayed
from a CUDA graph after an L2 flush as benchmarks/gpu_decode.py times it, two rounds, the better time kept.

    PYTHONPATH=src:benchmarks python tools/research/gpu_merge_settings.py

Prints one line per shape: the library's settings (MERGE_DIMS = 32, four warps, Triton's default), the fastest
pair, and every pair's µs. Each variant's output is checked against the library's.
"""

from __future__ import annotations

import argparse
import itertools
from unittest import mock

from gpu_decode import bench, decode_inputs

from tqlab.kernels import decode, decode_attention

SHAPES = [(1, 12, 2, 32768), (1, 12, 2, 65536), (1, 12, 2, 131072), (1, 32, 8, 32768), (16, 12, 2, 4096)]
LIBRARY = (decode.MERGE_DIMS, 4)


class _Warps:
    """The merge kernel launched with `warps` warps per program."""

    def __init__(self, kernel, warps: int):
        self.kernel, self.warps = kernel, warps

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, num_warps=self.warps, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    variants = list(itertools.product(args.dims, args.warps))
    for shape, bits in itertools.product(SHAPES, args.bits):
        inputs, _ = decode_inputs(*shape, bits)
        expected = decode_attention(*inputs)[0]
        times = {}
        for _, (dims, warps) in itertools.product(range(2), variants):
            with mock.patch.multiple(
                decode, MERGE_DIMS=dims, _merge_chunks=_Warps(decode._merge_chunks, warps)
            ):
                got = decode_attention(*inputs)[0]
                assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (shape, bits, dims, warps)
                time = bench(lambda: decode_attention(*inputs)[0])  # noqa: B023
            times[dims, warps] = min(times.get((dims, warps), float("inf")), time)
        best = min(times, key=times.get)
        batch, q_heads, kv_heads, context = shape
        print(
            f"batch {batch}, {q_heads}/{kv_heads} heads, {context // 1024}k, K{bits}V{bits}: library "
            f"{times[LIBRARY]:.1f} µs, fastest {best[0]} dims / {best[1]} warps {times[best]:.1f} µs ("
            + ", ".join(f"{d}/{w} {t:.1f}" for (d, w), t in times.items())
            + ")",
            flush=True,
        )


if __name__ == "__main__":
    main()
