"""Encode / decode throughput of the codecs on CPU, written as a Markdown table to docs/benchmarks.md.

    python benchmarks/codec_speed.py                  # the full grid (make bench)
    python benchmarks/codec_speed.py --dims 128 --bits 3 --rotations random_haar

Each figure is the best of `--repeats` timings of one call on `--vectors` random vectors (fp32 input),
so it measures the codec, not Python start-up. The shared CPU drifts: compare rows of one run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from docs_section import write_section

from tqlab.quant import TurboQuantMSE, TurboQuantProd

ROTATIONS = [
    "identity",
    "random_haar",
    "fast_hadamard",
    "block_so8_static",
    "block_so8_learned",
    "fast_hadamard+block_so8_learned",
]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, codebook caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", type=int, default=16384)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rotations", nargs="+", default=ROTATIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = "| codec | rotation | d | bits | bits/coord stored | encode vec/s | decode vec/s |"
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    print(header, flush=True)
    with torch.inference_mode():
        for dim in args.dims:
            x = torch.randn(args.vectors, dim, generator=torch.Generator().manual_seed(dim))
            for bits in args.bits:
                for rotation in args.rotations:
                    for name, cls in (("mse", TurboQuantMSE), ("prod", TurboQuantProd)):
                        codec = cls(dim, bits, rotation=rotation)
                        code = codec.quantize(x)
                        enc = best_time(lambda c=codec, v=x: c.quantize(v), args.repeats)
                        dec = best_time(lambda c=codec, k=code: c.dequantize(k), args.repeats)
                        row = (
                            f"| {name} | {rotation} | {dim} | {bits} | {code.bits_per_coordinate:.3f} "
                            f"| {args.vectors / enc:.3g} | {args.vectors / dec:.3g} |"
                        )
                        rows.append(row)
                        print(row, flush=True)

    if str(args.out) == "-":
        return
    command = "python " + " ".join(sys.argv)
    section = "\n".join(
        [
            "## Codec throughput on CPU",
            "",
            f"`{command}` — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {args.threads} threads, {args.vectors} fp32 vectors per call, "
            f"best of {args.repeats}.",
            "",
            *rows,
        ]
    )
    write_section(args.out, "codec_speed", section)


if __name__ == "__main__":
    main()
