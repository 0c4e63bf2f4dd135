"""Where a CPU quantize's time goes, op by op, on one thread (the numbers behind `quant.mse.count_below`,
`quant.mse.CPU_SEARCH_MAX_ELEMENTS` and `quant.packing.pack_bits`; docs/benchmarks.md, "The CPU target").

    PYTHONPATH=src python tools/research/cpu_quantize_parts.py
    PYTHONPATH=old/src python tools/research/cpu_quantize_parts.py --parts   # an older commit's parts

Prints µs per vector of each step of a 3-bit Prod quantize of one block (512 rows at d = 256: the block
`quant.codes.in_row_blocks` runs on one thread) on the tensor path and, with a C compiler, on the native encode
(`quant.native`), then µs per 2^17 elements of a comparison into bool and into
float and of the conversions after it, then the encode's compare passes against its binary search by size.
"""

from __future__ import annotations

import argparse
import time

import torch

from tqlab.quant import TurboQuantProd, pack_bits
from tqlab.quant.codebook import lloyd_max_codebook
from tqlab.quant.mse import count_below

try:
    from tqlab.quant import native
except ImportError:  # an older commit's src (PYTHONPATH=old/src), from before the native encode
    native = None


def microseconds(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def parts() -> None:
    codec = TurboQuantProd(256, 3, rotation="fast_hadamard", seed=0)
    mse, rows = codec.mse, 512
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(0))
    unit, _ = mse._unit(x, "parts")
    y = codec.rotation.apply(unit)
    idx = mse.encode_rotated(y)
    residual = y - mse.decode_rotated(idx)
    projected = residual @ codec.projection.T
    signs = (projected >= 0).to(torch.uint8)
    steps = {
        "tensor path: whole block (_quantize_rows)": lambda: codec._quantize_rows(x),
        "norm and unit vector": lambda: mse._unit(x, "parts"),
        "rotation (fast Hadamard)": lambda: codec.rotation.apply(unit),
        "encode (2 bits)": lambda: mse.encode_rotated(y),
        "centroid lookup": lambda: mse.decode_rotated(idx),
        "residual": lambda: y - mse.decode_rotated(idx),
        "QJL projection (d x d product)": lambda: residual @ codec.projection.T,
        "signs to uint8": lambda: (projected >= 0).to(torch.uint8),
        "pack 1-bit signs": lambda: pack_bits(signs, 1),
        "residual norm": lambda: residual.norm(dim=-1),
        "pack 2-bit codes": lambda: pack_bits(idx, 2),
    }
    if native is not None and native.library() is not None:
        hadamard = (codec.rotation.signs_in, codec.rotation.scale * codec.rotation.signs_out)
        b, c = mse.boundaries, mse.centroids
        steps |= {
            "native: whole quantize": lambda: codec.quantize(x),
            "native: C pass, Stage 1 (norm, rotation, codes, packing)": lambda: native.encode(
                x, 2, b, c, hadamard
            ),
            "native: C pass with the residual, QJL product, C sign packing": lambda: native.encode(
                x, 2, b, c, hadamard, codec.projection
            ),
        }
    print(f"3-bit Prod, d = 256, {rows} rows, 1 thread, torch {torch.__version__}; µs per vector")
    print("| step | µs |\n| --- | --- |")
    for name, fn in steps.items():
        print(f"| {name} | {microseconds(fn) / rows:.3f} |")


def comparisons() -> None:
    y = torch.randn(512, 256, generator=torch.Generator().manual_seed(1)) / 16
    into_float, counts = torch.empty_like(y), torch.randint(0, 4, y.shape).float()
    ops = {
        "y > b (into bool)": lambda: y > 0.06,
        "torch.gt(y, b, out=float)": lambda: torch.gt(y, 0.06, out=into_float),
        "float -> uint8": lambda: counts.to(torch.uint8),
        "float -> int32 -> uint8": lambda: counts.to(torch.int32).to(torch.uint8),
        "y - y (a float op, for scale)": lambda: y - y,
    }
    print("\n2^17 fp32 elements, 1 thread; µs per call\n| op | µs |\n| --- | --- |")
    for name, fn in ops.items():
        print(f"| {name} | {microseconds(fn):.1f} |")


def search_or_passes() -> None:
    sizes = (64, 256, 1024, 4096, 16384, 65536)
    print("\ncount_below, 1 thread; µs per call, compare passes / binary search")
    print("| bits | " + " | ".join(f"{n} elements" for n in sizes) + " |")
    print("| --- " * (len(sizes) + 1) + "|")
    for bits in (1, 2, 3, 4):
        boundaries = torch.tensor(lloyd_max_codebook(128, bits)[1], dtype=torch.float32)
        cells = []
        for n in sizes:
            y = torch.randn(n, generator=torch.Generator().manual_seed(n)) / 11
            passes = microseconds(lambda y=y, b=boundaries: count_below(y, b, search=False))
            search = microseconds(lambda y=y, b=boundaries: count_below(y, b, search=True))
            cells.append(f"{passes:.1f} / {search:.1f}")
        print(f"| {bits} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", action="store_true", help="only the steps of the Prod quantize")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts()
    if not args.parts:
        comparisons()
        search_or_passes()


if __name__ == "__main__":
    main()
