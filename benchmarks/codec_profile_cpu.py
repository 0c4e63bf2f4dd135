"""Where a codec's CPU time goes: vectors per CPU-second on the native encode and on the tensor path, in
alternating rounds, then torch.profiler's operator table for repeated `quantize` calls.

    PYTHONPATH=src python benchmarks/codec_profile_cpu.py                          # prod, 3 bits, d = 256, 1 thread
    PYTHONPATH=src python benchmarks/codec_profile_cpu.py --codec turboquant_mse --threads 2
    PYTHONPATH=src python benchmarks/codec_profile_cpu.py --compile      # torch.compile'd quantize beside eager

The native encode (`tqlab.quant.native`, compiled C) and the tensor path (TQLAB_NATIVE=0) are timed in the same
process, round after round, with the profiler off; the table after them is the default path's, profiler on
(its C calls show there only as the gap between the operators' total and the wall time).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tqlab.quant import TurboQuantMSE, TurboQuantProd

try:
    from tqlab.quant import native
except ImportError:  # an older commit's src (PYTHONPATH=old/src): the tensor path only
    native = None

CODECS = {"turboquant_prod": TurboQuantProd, "turboquant_mse": TurboQuantMSE}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codec", choices=list(CODECS), default="turboquant_prod")
    parser.add_argument("--rotation", default="fast_hadamard")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--vectors", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="quantize calls per timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two paths")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(codec.quantize)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = CODECS[args.codec](args.dim, args.bits, rotation=args.rotation, seed=0)
    x = torch.randn(args.vectors, args.dim, generator=torch.Generator().manual_seed(0))
    total = args.vectors * args.repeats
    chosen = os.environ.get("TQLAB_NATIVE")
    print(f"{args.codec} {args.bits}-bit, {args.rotation}, d = {args.dim}, {args.threads} thread(s), "
          f"{args.vectors} vectors × {args.repeats}, torch {torch.__version__}")  # fmt: skip
    print("| round | path | vectors/s | per CPU-second |\n| --- | --- | --- | --- |")
    for round_ in range(args.rounds):
        for path, switch in (("native", "1"), ("tensor", "0")):
            os.environ["TQLAB_NATIVE"] = switch
            if native is not None:
                native.library.cache_clear()
            if path == "native" and (native is None or native.library() is None):
                continue
            codec.quantize(x)  # warm up
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.repeats):
                codec.quantize(x)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(f"| {round_ + 1} | {path} | {total / wall:.3g} | {total / cpu:.3g} |")
    os.environ.pop("TQLAB_NATIVE", None)
    if chosen is not None:
        os.environ["TQLAB_NATIVE"] = chosen
    if native is not None:
        native.library.cache_clear()
    with torch.profiler.profile() as profile:
        for _ in range(args.repeats):
            codec.quantize(x)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.compile:
        quantize = torch.compile(codec.quantize, dynamic=False)
        start = time.perf_counter()
        code = quantize(x)
        print(f"torch.compile: {time.perf_counter() - start:.0f} s to compile; codes equal to eager: "
              f"{torch.equal(code.indices, codec.quantize(x).indices)}")  # fmt: skip
        for name, fn in (("eager", codec.quantize), ("torch.compile", quantize)):
            cpu = time.process_time()
            for _ in range(args.repeats):
                fn(x)
            print(f"{name}: {total / (time.process_time() - cpu):.3g} vectors per CPU-second (profiler off)")


if __name__ == "__main__":
    main()
