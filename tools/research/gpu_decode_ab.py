"""The library's decode kernel against another version of it, in one run on one GPU (same inputs, same timer):
how a kernel change was measured before it was kept.

    mkdir -p prev_kernels && for f in decode packed; do git show 0f4216b:src/tqlab/kernels/$f.py > prev_kernels/$f.py; done
    PYTHONPATH=src python tools/research/gpu_decode_ab.py --against prev_kernels --bits 2

`--against` is a folder holding the other version's decode.py, packed.py and (from commit 1e89ca1 on)
decode_mma.py (the GPU machine has no git, so the folder travels with the tree). Prints one line per case: SDPA over a bf16 cache, the other version, this one,
and the largest difference between the two outputs relative to the output's scale.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import bench, bf16_times, codec_indices, decode_inputs  # noqa: E402

from tqlab.kernels import centroid_table, decode_attention  # noqa: E402


def load_kernels(folder: Path, module: str = "decode"):
    """`module`.py of `folder` imported as a package next to the folder's other modules (packed.py, and
    decode_mma.py where that version has it), copied into a temporary package so that nothing is written
    into `folder` (its source differs from the library's, so Triton compiles and caches it apart)."""
    package_dir = Path(tempfile.mkdtemp()) / "other_kernels"
    package_dir.mkdir()
    for source in folder.glob("*.py"):  # imports from the library outside kernels/ go to the installed one
        (package_dir / source.name).write_text(re.sub(r"from \.\.(\w)", r"from tqlab.\1", source.read_text()))
    (package_dir / "__init__.py").touch()
    sys.path.insert(0, str(package_dir.parent))
    return importlib.import_module(f"other_kernels.{module}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layouts", nargs="+", default=["32/8", "12/2"], help="query heads/KV heads")
    parser.add_argument("--dim", type=int, default=128, help="head_dim")
    args = parser.parse_args()
    other = load_kernels(args.against)
    # a version from before sign-magnitude labels reads 4-bit codes as the codec's indices, with the plain table
    plain = not hasattr(importlib.import_module("other_kernels.packed"), "sign_magnitude")
    print(
        "| batch | q/KV heads | context | bits | SDPA bf16 µs | other µs | this µs | speed-up | vs SDPA | max rel Δ |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layout in args.layouts:
        q_heads, kv_heads = map(int, layout.split("/"))
        for batch in args.batches:
            for context in args.contexts:
                sdpa, _ = bf16_times(batch, q_heads, kv_heads, context, flex=False, dim=args.dim)
                for bits in args.bits:
                    inputs, codecs = decode_inputs(batch, q_heads, kv_heads, context, bits, dim=args.dim)
                    their_inputs = inputs
                    if plain and bits == 4:
                        indices = [codec_indices(c, bits) for c in inputs[1:5:2]]
                        tables = [centroid_table(c.centroids) for c in codecs]
                        their_inputs = (inputs[0], indices[0], inputs[2], indices[1], inputs[4], *tables, *inputs[7:])  # fmt: skip
                    theirs, ours = other.decode_attention(*their_inputs)[0], decode_attention(*inputs)[0]
                    delta = ((ours - theirs).abs().max() / theirs.abs().max()).item()
                    before = bench(functools.partial(other.decode_attention, *their_inputs))
                    after = bench(functools.partial(decode_attention, *inputs))
                    print(f"| {batch} | {layout} | {context // 1024}k | K{bits}V{bits} | {sdpa:.1f} | {before:.1f} | "
                          f"{after:.1f} | {before / after:.2f}× | {sdpa / after:.2f}× | {delta:.0e} |", flush=True)  # fmt: skip
                    del inputs
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
