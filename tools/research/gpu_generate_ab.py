"""A/B of whole decode steps between two source trees: `benchmarks/gpu_generate.py` run for each tree in a
process of its own, alternating, round after round, and the ms per step of every row side by side.

    mkdir -p ab/base && git archive COMMIT src | tar -x -C ab/base
    python tools/research/gpu_generate_ab.py --against ab/base --rounds 2 -- \\
        --graphs --archs Qwen2.5-Coder-1.5B --contexts 32768 --batches 1 --caches K4V4 --steps 64

Each process imports tqlab from its own tree (this checkout's src, or DIR/src) and the benchmarks of this
checkout, so only the library differs; the caller's PYTHONPATH (say, wheels a GPU machine lacks) comes after
them. One process per tree and round, alternating, is how the A/B runs of docs/benchmarks.md ("A frozen step's
kernels chained by programmatic launch") were made by hand. There a CUDA-graph step of the same tree differed
by up to 0.02 ms between processes, so smaller differences need more rounds. Needs a CUDA GPU, as
gpu_generate.py does; first run there for "The merge's early launch inside a whole step" (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = ("model", "batch", "context", "cache")
TIME = "decode ms/step"


def rows(table: str) -> dict[tuple, float]:
    """{(model, batch, context, cache): ms per step} from gpu_generate.py's markdown table."""
    header, found = None, {}
    for line in table.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if TIME in cells:
            header = cells
            continue
        if header is None or len(cells) != len(header):
            continue
        row = dict(zip(header, cells, strict=True))
        found[tuple(row[k] for k in KEY)] = float(row[TIME])
    return found


def run(tree: Path, args: list[str]) -> dict[tuple, float]:
    paths = [str(tree / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))  # the caller's after the tree
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_generate.py"), *args, "--out", "-"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"gpu_generate.py failed with {tree / 'src'}:\n{done.stderr[-3000:]}")
    return rows(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, required=True, help="the other tree (its src/ is imported)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("generate", nargs=argparse.REMAINDER, help="-- then gpu_generate.py's arguments")
    args = parser.parse_args()
    generate = [a for a in args.generate if a != "--"]
    if not (args.against / "src" / "tqlab").is_dir():
        raise SystemExit(
            f"{args.against} holds no src/tqlab (git archive COMMIT src | tar -x -C {args.against})"
        )
    trees = {"base": args.against.resolve(), "this": ROOT}
    times: dict[str, dict[tuple, list[float]]] = {name: {} for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            for key, ms in run(tree, generate).items():
                times[name].setdefault(key, []).append(ms)
            print(f"round {round_ + 1}: {name} done", file=sys.stderr, flush=True)
    print("| model | batch | context | cache | base ms per step | this ms per step | this / base (medians) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key in dict.fromkeys([*times["base"], *times["this"]]):  # rows of either tree, in order
        base, this = times["base"].get(key, []), times["this"].get(key, [])
        ratio = f"{statistics.median(this) / statistics.median(base):.3f}" if this and base else ""
        listed = (", ".join(f"{t:.2f}" for t in side) for side in (base, this))
        print(f"| {' | '.join(key)} | {next(listed)} | {next(listed)} | {ratio} |")


if __name__ == "__main__":
    main()
