"""Fast Hadamard on CPU: the butterfly passes (`fwht`) against one dense d × d product, interleaved in one run.

    PYTHONPATH=src python benchmarks/hadamard_cpu.py

Best of 20 (small batches) or 5 timed calls each; prints a markdown table of passes / dense time ratios (above 1:
the dense product is faster). `FastHadamard` takes the dense product up to `DENSE_MAX_DIM`.
"""

from __future__ import annotations

import functools

import torch
from codec_speed import best_time

from tqlab.rotation import make_rotation
from tqlab.rotation.hadamard import fwht


def _passes(x: torch.Tensor, r) -> torch.Tensor:
    return fwht(x * r.signs_in) * (r.scale * r.signs_out)


def main() -> None:
    print("| threads | vectors | d | passes ms | dense ms | passes / dense |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in (8, 256, 16384):
            for d in (64, 128, 256, 512):
                r = make_rotation("fast_hadamard", d, seed=0)
                x, dense = torch.randn(n, d), r.dense()
                passes = functools.partial(_passes, x, r)
                product = functools.partial(torch.matmul, x, dense.T)
                repeats = 20 if n < 1000 else 5
                a, b = best_time(passes, repeats), best_time(product, repeats)
                print(f"| {threads} | {n} | {d} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
