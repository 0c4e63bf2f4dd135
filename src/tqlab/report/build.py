"""Turn finished evaluations into report.md with tables, paired statistics and trade-off plots."""

from __future__ import annotations

import itertools
import json
import logging
import math
import textwrap
from pathlib import Path

from .collect import Evaluation, collect
from .stats import describe, friedman, holm, paired_difference

log = logging.getLogger(__name__)
LOWER_IS_BETTER = {"attention_kl", "output_rel_error"}


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and x.is_integer() and abs(x) >= 100:
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _bits(ev: Evaluation) -> str:
    _, k, v = ev.setting
    return "/".join(f"{side}{b}" for side, b in (("K", k), ("V", v)) if b is not None)


def _by_block(ev: Evaluation, metric: str) -> dict:
    return {(r["layer"], r["kv_head"], r["sequence"]): r[metric] for r in ev.rows}


def summary_table(evals: list[Evaluation], metrics: list[str]) -> tuple[str, list[dict]]:
    header = ["configuration", "kv", "k bits", "v bits", "stored bits/coord (K+V)", "KV bytes/token"]
    header += [f"{m} mean ± SD [95 % CI] (n)" for m in metrics]
    rows, records = [], []
    for ev in sorted(evals, key=lambda e: (e.setting, e.label)):
        o, c = ev.summary["overall"], ev.summary["columns"]
        row = [
            ev.label,
            c["kv"],
            c["k_bits"],
            c["v_bits"],
            o["kv_bits_per_coordinate"],
            o.get("kv_bytes_per_token"),
        ]
        record = {
            "configuration": ev.label,
            "kv": c["kv"],
            "k_bits": c["k_bits"],
            "v_bits": c["v_bits"],
            "kv_bits": o["kv_bits_per_coordinate"],
            "kv_bytes_per_token": o.get("kv_bytes_per_token"),
        }
        for m in metrics:
            d = describe(r[m] for r in ev.rows)
            row.append(
                f"{_fmt(d['mean'])} ± {_fmt(d['sd'], 3)} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] ({d['n']})"
            )
            record.update({f"{m}_{k}": v for k, v in d.items()})
        rows.append(row)
        records.append(record)
    return _table(header, rows), records


def paired_tables(evals: list[Evaluation], metrics: list[str]) -> tuple[str, list[dict]]:
    """Within each (kv, bits) setting: Friedman across configurations, pairwise Wilcoxon with Holm."""
    parts, records = [], []
    settings = sorted({e.setting for e in evals}, key=str)
    for setting in settings:
        group = sorted((e for e in evals if e.setting == setting), key=lambda e: e.label)
        if len(group) < 2:
            continue
        parts.append(f"### kv = {setting[0]}, k bits = {setting[1]}, v bits = {setting[2]}")
        for metric in metrics:
            blocks = sorted(set.intersection(*(set(_by_block(e, metric)) for e in group)))
            columns = [[_by_block(e, metric)[b] for b in blocks] for e in group]
            p_friedman = friedman(columns) if len(group) >= 3 else math.nan
            pairs = []
            for (i, a), (j, b) in itertools.combinations(enumerate(group), 2):
                pairs.append((a, b, paired_difference(columns[i], columns[j])))
            adjusted = holm([p["p"] for _, _, p in pairs])
            rows = []
            for (a, b, p), p_adj in zip(pairs, adjusted, strict=True):
                rows.append(
                    [
                        b.label,
                        a.label,
                        p["n"],
                        p["median_diff"],
                        f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]",
                        p["p"],
                        p_adj,
                    ]
                )
                records.append(
                    {
                        "setting": list(setting),
                        "metric": metric,
                        "a": a.label,
                        "b": b.label,
                        **p,
                        "p_holm": p_adj,
                    }
                )
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            parts.append(
                f"**{metric}** ({better} is better) over {len(blocks)} paired (layer, head, sequence) blocks; "
                f"Friedman p = {_fmt(p_friedman)}"
            )
            parts.append(
                _table(["B", "A", "pairs", "median B − A", "bootstrap 95 % CI", "Wilcoxon p", "Holm p"], rows)
            )
    return "\n\n".join(parts) if parts else "_No setting has two configurations to compare._", records


def _pareto(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Non-dominated points, by increasing memory: each one better than every cheaper point."""
    sign = 1 if higher_better else -1
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return front


def figures(evals: list[Evaluation], metrics: list[str], out: Path, reference: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in [m for m in metrics if m in ("output_cosine", "attention_kl")] or metrics[:1]:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        pts = []
        for ev in evals:
            x = (
                ev.summary["overall"].get("kv_bytes_per_token")
                or ev.summary["overall"]["kv_bits_per_coordinate"]
            )
            y = describe(r[metric] for r in ev.rows)["mean"]
            pts.append((x, y))
            ax.scatter(x, y, s=40, label=f"{ev.label} ({_bits(ev)})")
        ax.margins(x=0.1, y=0.1)
        front = _pareto(pts, metric not in LOWER_IS_BETTER)
        ax.plot(*zip(*front, strict=True), "k--", lw=1, marker="o", mfc="none", ms=13, label="Pareto front")
        _finish_axes(
            ax,
            "K+V bytes per token (stored)",
            f"{metric} (mean over blocks)",
            f"Quality vs memory: {metric}",
            8,
        )
        paths.append(_save(fig, out / f"pareto_{metric}.png"))

    metric = metrics[0]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for ev in sorted(evals, key=lambda e: (e.setting, e.label)):
        layers = sorted({r["layer"] for r in ev.rows})
        means = [describe(r[metric] for r in ev.rows if r["layer"] == la)["mean"] for la in layers]
        ax.plot(layers, means, marker=".", label=f"{ev.label} ({_bits(ev)})")
    _finish_axes(ax, "layer", metric, f"{metric} per layer", 7)
    paths.append(_save(fig, out / f"per_layer_{metric}.png"))

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for label in sorted({e.label for e in evals}):
        group = sorted(
            (e for e in evals if e.label == label), key=lambda e: e.setting[1] or e.setting[2] or 0
        )
        bits = [e.setting[1] if e.setting[1] is not None else e.setting[2] for e in group]
        stats = [describe(r[metric] for r in e.rows) for e in group]
        ax.errorbar(
            bits,
            [s["mean"] for s in stats],
            yerr=[s["sd"] for s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
    _finish_axes(
        ax,
        "bits (keys, or values when only values are compressed)",
        f"{metric}: mean ± SD over blocks",
        f"{metric} by bits",
        7,
    )
    paths.append(_save(fig, out / f"by_bits_{metric}.png"))

    diffs = []
    for ev in evals:
        refs = [
            r
            for r in evals
            if r.setting == ev.setting and r.summary["columns"]["rotation"] == reference and r is not ev
        ]
        if refs:
            a, b = _by_block(refs[0], metric), _by_block(ev, metric)
            blocks = sorted(set(a) & set(b))
            diffs.append(
                (
                    f"{ev.label} ({_bits(ev)})",
                    paired_difference([a[k] for k in blocks], [b[k] for k in blocks]),
                )
            )
    if diffs:
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(diffs) + 1.8))
        for i, (_, d) in enumerate(diffs):
            ax.errorbar(
                d["median_diff"],
                i,
                xerr=[[d["median_diff"] - d["ci_low"]], [d["ci_high"] - d["median_diff"]]],
                fmt="o",
                capsize=4,
            )
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(range(len(diffs)), [textwrap.fill(label, 48) for label, _ in diffs], fontsize=7)
        _finish_axes(
            ax,
            f"median paired difference in {metric} vs {reference} (bootstrap 95 % CI)",
            "",
            f"Against {reference} on the same held-out blocks",
            None,
        )
        paths.append(_save(fig, out / f"vs_{reference}_{metric}.png"))
    return paths


def _finish_axes(ax, xlabel: str, ylabel: str, title: str, legend: int | None = 7) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:  # beside the axes: with many configurations a legend inside would cover the data
        ax.legend(fontsize=legend, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def build_report(
    runs: str | Path,
    out: Path,
    metrics: list[str],
    reference: str = "random_haar",
    command: str = "",
    wandb: dict | None = None,
) -> Path:
    evals, missing = collect(runs)
    unknown = [m for m in metrics if m not in evals[0].rows[0]]
    if unknown:
        raise ValueError(
            f"report.metrics has {unknown}, which the results do not have; they have {sorted(evals[0].rows[0])}"
        )
    out.mkdir(parents=True, exist_ok=True)
    table, summary_records = summary_table(evals, metrics)
    paired, paired_records = paired_tables(evals, metrics)
    pictures = figures(evals, metrics, out, reference)
    c = evals[0].summary["columns"]
    text = [
        "# tqlab report",
        "",
        f"`{command}`" if command else "",
        "",
        f"{len(evals)} finished evaluations of model `{c['model']}` on capture `{c['capture']}` ({c['data']} text, test split) from `{runs}`.",
        "Values are means over (layer, KV head, sequence) blocks of held-out text; each block's value is the mean over its queries.",
        "",
    ]
    if missing:
        text += ["**Unfinished jobs (not in this report):**", "", *[f"- {m}" for m in missing], ""]
    text += ["## Summary", "", table, "", "## Paired comparisons", "", paired, "", "## Figures", ""]
    text += [f"![{p.stem}]({p.name})" for p in pictures]
    report = out / "report.md"
    report.write_text("\n".join(text) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {"summary": summary_records, "paired": paired_records, "missing": missing}, indent=2, default=str
        )
    )
    if wandb and wandb.get("mode", "disabled") != "disabled":
        _to_wandb(wandb, out, summary_records, paired_records, pictures, str(runs))
    log.info("report written to %s", report)
    return report


def _to_wandb(
    settings: dict, out: Path, summary: list[dict], paired: list[dict], pictures: list[Path], runs: str
) -> None:
    import wandb

    from ..wandb_run import finish_wandb

    run = wandb.init(
        project=settings.get("project", "tqlab"),
        mode=settings["mode"],
        dir=str(out),
        job_type="report",
        config={"runs": runs},
    )
    try:
        for name, records in (("summary", summary), ("paired", paired)):
            if records:
                cols = list(records[0])
                run.log(
                    {
                        name: wandb.Table(
                            columns=cols,
                            data=[
                                [json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in cols]
                                for r in records
                            ],
                        )
                    }
                )
        run.log({p.stem: wandb.Image(str(p)) for p in pictures})
    finally:
        finish_wandb()
