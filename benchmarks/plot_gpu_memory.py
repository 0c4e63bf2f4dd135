"""Plot the GPU-memory study's table from docs/benchmarks.md (written by gpu_memory.py on an H200).

    python benchmarks/plot_gpu_memory.py        # → docs/figures/gpu_memory.png

Cache bytes against context, per model and cache (bf16, K4V4, K3V3, K2V2 by default: `--caches` picks others
of the table), at batch 1 and 8, on log axes, with the memory left next to the weights on the GPU drawn as a
line: where a curve crosses it, that context no longer fits (the table's OOM rows are drawn as crosses where
their bytes per token would have put them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from docs_section import table_cells

GPU_MIB = 140 * 1024  # the H200 of the run


def rows(text: str) -> list[dict]:
    cells = table_cells(
        text, "GPU memory of the KV cache",
        "docs/benchmarks.md has no GPU-memory section: run benchmarks/gpu_memory.py on a GPU first",
    )  # fmt: skip
    out = []
    for row in cells:
        if len(row) == 9 and row[3].isdigit():
            model, weights, cache, batch, context, stored = row[:6]
            out.append(
                {"model": model, "weights": float(weights), "cache": cache, "batch": int(batch),
                 "context": int(context), "stored": None if stored == "OOM" else float(stored)}
            )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures/gpu_memory.png"))
    parser.add_argument("--caches", nargs="+", default=["bf16", "K4V4", "K3V3", "K2V2"])
    args = parser.parse_args()
    data = [r for r in rows(args.docs.read_text()) if r["cache"] in args.caches]
    models = list(dict.fromkeys(r["model"] for r in data))  # in the table's order
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in data if r["model"] == model]
        for cache, batch in sorted({(r["cache"], r["batch"]) for r in mine}):
            same = [r for r in mine if r["cache"] == cache and r["batch"] == batch]
            points = sorted((r["context"], r["stored"]) for r in same if r["stored"] is not None)
            if (
                not points
            ):  # nothing of this series fitted: no line to draw, no bytes per token to place its crosses
                continue
            line = ax.plot(
                *zip(*points, strict=True), "--o" if batch > 1 else "-o", label=f"{cache}, batch {batch}"
            )
            per_token = points[-1][1] / points[-1][0]
            for r in same:
                if r["stored"] is None:
                    ax.plot(
                        r["context"], per_token * r["context"], "x", ms=10, mew=2, color=line[0].get_color()
                    )
                    ax.annotate("OOM", (r["context"], per_token * r["context"]), textcoords="offset points",
                                xytext=(-28, 4), fontsize=8)  # fmt: skip
        ax.axhline(GPU_MIB - mine[0]["weights"], color="k", lw=0.8)
        ax.text(
            4096, (GPU_MIB - mine[0]["weights"]) * 1.1, "H200 memory left next to the weights", fontsize=8
        )
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", title=model)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("KV cache, stored MiB (×: did not fit)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
