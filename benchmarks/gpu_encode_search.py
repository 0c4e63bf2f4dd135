"""Encoding rotated coordinates on a GPU: one binary search (torch.bucketize, what TurboQuantMSE uses on
CUDA) against 2^b − 1 compare passes (what it uses on CPU), on 512M coordinates.

    PYTHONPATH=src python benchmarks/gpu_encode_search.py
"""

from __future__ import annotations

import torch

from tqlab.quant.codebook import lloyd_max_codebook
from tqlab.quant.mse import count_below


def milliseconds(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def main() -> None:
    y = torch.randn(512_000_000, device="cuda") / 128**0.5  # rotated unit-vector coordinates, d = 128
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| bits | compare passes ms | bucketize ms | speed-up |\n| --- | --- | --- | --- |")
    for bits in (2, 3, 4):
        b = torch.tensor(lloyd_max_codebook(128, bits)[1], dtype=torch.float32, device="cuda")
        passes = milliseconds(lambda b=b: count_below(y, b, search=False))
        search = milliseconds(lambda b=b: count_below(y, b, search=True))
        print(f"| {bits} | {passes:.2f} | {search:.2f} | {passes / search:.1f}× |")


if __name__ == "__main__":
    main()
