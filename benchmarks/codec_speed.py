"""Encode / decode throughput of the codecs on CPU or a GPU, written as a Markdown table to docs/benchmarks.md.

    python benchmarks/codec_speed.py                  # the full grid (make bench)
    python benchmarks/codec_speed.py --dims 128 --bits 3 --rotations random_haar
    PYTHONPATH=src python benchmarks/codec_speed.py --device cuda --codecs all   # every codec, on a GPU

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

from tqlab.quant import make_codec

ROTATIONS = [
    "identity",
    "random_haar",
    "fast_hadamard",
    "block_so8_static",
    "block_so8_learned",
    "fast_hadamard+block_so8_learned",
    "eigen_hadamard",  # fitted on the timed vectors themselves (the builder fits it on train vectors)
    "so8_butterfly",
]
TURBOQUANT = ("turboquant_mse", "turboquant_prod")
OTHERS = {  # codec → the rotations it takes
    "int8_block": ("identity",),
    "int4_block": ("identity", "fast_hadamard"),
    "kivi": ("identity",),
    "transform_coding": ("identity",),
}


def build(name: str, dim: int, bits: int, rotation: str, x: torch.Tensor):
    """The codec, fitted on x where it is data-aware; None where the codec does not take these bits."""
    from tqlab import registry
    from tqlab.rotation import EigenHadamard, make_rotation

    try:
        registry.check_bits(name, bits, dim=dim)
    except registry.RuleError:
        return None
    options = {"rotation": rotation} if name in TURBOQUANT or name == "int4_block" else {}
    if name in TURBOQUANT and rotation == "eigen_hadamard":
        options["rotation"] = make_rotation(rotation, dim)
    if name == "kivi":
        options["axis"] = "token"  # values' layout: groups of channels within a vector
    codec = make_codec(name, dim, bits, **options).to(x.device)
    if isinstance(options.get("rotation"), EigenHadamard):
        options["rotation"].fit(x)
    if name == "transform_coding":
        codec.calibrate(x)
    return codec


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
    parser.add_argument("--codecs", nargs="+", default=list(TURBOQUANT), help="names, or 'all'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    codecs = list(TURBOQUANT) + list(OTHERS) if args.codecs == ["all"] else args.codecs
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    header = "| codec | rotation | d | bits | bits/coord stored | encode vec/s | decode vec/s |"
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    print(header, flush=True)
    with torch.inference_mode():
        for dim in args.dims:
            x = torch.randn(args.vectors, dim, generator=torch.Generator().manual_seed(dim)).to(device)
            for bits in args.bits:
                for name in codecs:
                    for rotation in args.rotations if name in TURBOQUANT else OTHERS[name]:
                        codec = build(name, dim, bits, rotation, x)
                        if codec is None:
                            continue
                        code = codec.quantize(x)
                        enc = best_time(lambda c=codec, v=x: (c.quantize(v), sync()), args.repeats)
                        dec = best_time(lambda c=codec, k=code: (c.dequantize(k), sync()), args.repeats)
                        row = (
                            f"| {name} | {rotation} | {dim} | {bits} | {code.bits_per_coordinate:.3f} "
                            f"| {args.vectors / enc:.3g} | {args.vectors / dec:.3g} |"
                        )
                        rows.append(row)
                        print(row, flush=True)

    if str(args.out) == "-":
        return
    command = "python " + " ".join(sys.argv)
    where = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    section = "\n".join(
        [
            f"## Codec throughput on {'GPU' if device.type == 'cuda' else 'CPU'}",
            "",
            f"`{command}` — {datetime.date.today()}, {where}, torch {torch.__version__}, {args.vectors} fp32 "
            f"vectors per call, best of {args.repeats}.",
            "",
            *rows,
        ]
    )
    write_section(args.out, "codec_speed" if device.type == "cpu" else "codec_speed_gpu", section)


if __name__ == "__main__":
    main()
