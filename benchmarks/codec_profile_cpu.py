"""Where a codec's CPU time goes: torch.profiler's operator table for repeated `quantize` calls.

    PYTHONPATH=src python benchmarks/codec_profile_cpu.py                          # prod, 3 bits, d = 256, 1 thread
    PYTHONPATH=src python benchmarks/codec_profile_cpu.py --codec turboquant_mse --threads 2
    PYTHONPATH=src python benchmarks/codec_profile_cpu.py --compile      # torch.compile'd quantize beside eager

Prints vectors per second and per CPU-second, then the operators by self time: the dense d × d products
(rotation, QJL projection) against everything else.
"""

from __future__ import annotations

import argparse
import time

import torch

from tqlab.quant import TurboQuantMSE, TurboQuantProd

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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(codec.quantize)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = CODECS[args.codec](args.dim, args.bits, rotation=args.rotation, seed=0)
    x = torch.randn(args.vectors, args.dim, generator=torch.Generator().manual_seed(0))
    codec.quantize(x)  # warm up
    with torch.profiler.profile() as profile:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.repeats):
            codec.quantize(x)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    total = args.vectors * args.repeats
    print(f"{args.codec} {args.bits}-bit, {args.rotation}, d = {args.dim}, {args.threads} thread(s), torch "
          f"{torch.__version__}: {total / wall:.3g} vectors/s, {total / cpu:.3g} per CPU-second "
          "(profiler on: a few % slower)")  # fmt: skip
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.compile:
        quantize = torch.compile(codec.quantize, dynamic=False)
        start = time.perf_counter()
        code = quantize(x)
        print(f"torch.compile: {time.perf_counter() - start:.0f} s to compile; codes equal to eager: "
              f"{torch.equal(code.indices, codec.quantize(x).indices)}")  # fmt: skip
        for name, fn in (("eager", codec.quantize), ("compiled", quantize)):
            cpu = time.process_time()
            for _ in range(args.repeats):
                fn(x)
            print(f"{name}: {total / (time.process_time() - cpu):.3g} vectors per CPU-second (profiler off)")


if __name__ == "__main__":
    main()
