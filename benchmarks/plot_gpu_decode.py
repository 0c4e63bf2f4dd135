"""Plot the decode-attention table from docs/benchmarks.md (written by gpu_decode.py on an H200).

    python benchmarks/plot_gpu_decode.py        # → docs/figures/gpu_decode.png

One panel per batch and head layout: the step over codes against SDPA over a bf16 cache (SDPA's µs over the
codes' µs, so above 1 the codes are faster), per bit width, against context on a log axis. The issue's two
targets are drawn as lines: 2× SDPA and 1.3× the best bf16 kernel that installs, which on the H200 is SDPA
itself (FlashInfer and flash-attn were slower there: docs/benchmarks.md, "The best bf16 decode kernel that
installs"); both apply from 32k, the shaded span.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from docs_section import table_cells

TARGETS = {2.0: ("--", "target: 2× SDPA"), 1.3: (":", "target: 1.3× the best bf16 kernel (SDPA here)")}


def tokens(context: str) -> int:
    """'4k' → 4096, '128k' → 131072, '512' → 512."""
    return int(context[:-1]) * 1024 if context.endswith("k") else int(context)


def rows(text: str) -> list[dict]:
    cells = table_cells(
        text,
        "gpu_decode",
        "docs/benchmarks.md has no decode table: run benchmarks/gpu_decode.py on a GPU first",
    )
    out = []
    for row in cells:
        if len(row) >= 6 and row[0].isdigit():
            batch, heads, context, bits, sdpa, codes = row[:6]
            out.append(
                {"batch": int(batch), "heads": heads, "context": tokens(context), "bits": bits,
                 "speedup": float(sdpa) / float(codes)}
            )  # fmt: skip
    if not out:
        raise SystemExit("docs/benchmarks.md's decode table has no rows")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures/gpu_decode.png"))
    args = parser.parse_args()
    data = rows(args.docs.read_text())
    panels = list(dict.fromkeys((r["batch"], r["heads"]) for r in data))  # in the table's order
    grid = (-(-len(panels) // 2), 2)
    fig, axes = plt.subplots(*grid, figsize=(11, 4 * grid[0]), squeeze=False, sharey=True)
    speedups = [r["speedup"] for r in data]
    limits = (min(min(speedups), 1.0) * 0.9, max(max(speedups), max(TARGETS)) * 1.08)
    for ax, (batch, heads) in zip(axes.flat, panels, strict=False):
        mine = [r for r in data if r["batch"] == batch and r["heads"] == heads]
        for bits in sorted({r["bits"] for r in mine}):
            points = sorted((r["context"], r["speedup"]) for r in mine if r["bits"] == bits)
            ax.plot(*zip(*points, strict=True), "-o", label=bits)
        ax.axvspan(32768, max(r["context"] for r in mine) * 1.3, color="0.93", zorder=0)
        ax.axhline(1.0, color="0.5", lw=0.8)
        for level, (style, name) in TARGETS.items():
            ax.axhline(level, color="k", lw=0.9, ls=style, label=name)
        contexts = sorted({r["context"] for r in mine})
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
        ax.set(ylim=limits, xlabel="context (tokens)", title=f"batch {batch}, {heads} query/KV heads")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("speed-up over SDPA, bf16 cache")
    fig.suptitle("Decode attention, one layer and one step on an H200 (shaded: the targets' span, ≥ 32k)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
