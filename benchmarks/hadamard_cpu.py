"""Fast Hadamard on CPU: the butterfly passes (`fwht`) against one dense d × d product, interleaved in one run.

    PYTHONPATH=src python benchmarks/hadamard_cpu.py
    PYTHONPATH=src python benchmarks/hadamard_cpu.py --vectors 16 32 64 128 512 1024 --dims 128 256 --threads 1

Best of 20 (small batches) or 5 timed calls each; prints a markdown table of passes / dense time ratios (above 1:
the dense product is faster). `FastHadamard` takes the dense product on a GPU, below d = `DENSE_MAX_DIM`, and
at that d outside `PASSES_ELEMENTS` (rows × d per thread); the passes above it.
"""

from __future__ import annotations

import argparse
import functools

import torch
from codec_speed import best_time

from tqlab.rotation import make_rotation
from tqlab.rotation.hadamard import fwht


def _passes(x: torch.Tensor, r) -> torch.Tensor:
    return fwht(x * r.signs_in) * (r.scale * r.signs_out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", type=int, nargs="+", default=[8, 256, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print("| threads | vectors | d | passes ms | dense ms | passes / dense |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.vectors:
            for d in args.dims:
                r = make_rotation("fast_hadamard", d, seed=0)
                x, dense = torch.randn(n, d), r.dense()
                passes = functools.partial(_passes, x, r)
                product = functools.partial(torch.matmul, x, dense.T)
                repeats = 20 if n < 1000 else 5
                a, b = best_time(passes, repeats), best_time(product, repeats)
                print(f"| {threads} | {n} | {d} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
