"""Turn finished evaluations into report.md with tables, paired statistics and trade-off plots."""

from __future__ import annotations

import itertools
import json
import logging
import math
import textwrap
from pathlib import Path

from ..results import BLOCK_COLUMNS, higher_is_better
from .collect import Configuration, ReportError, collect, group_seeds
from .schema import UNIT_INDEPENDENCE, UNITS
from .stats import describe, friedman, holm, nanmean, paired_difference, row_mean, unit_means

log = logging.getLogger(__name__)
MARKERS = "osD^vP*Xph"  # one per (kv, bits) setting; colour is the configuration


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


def _bits(b) -> str:
    """Configured bits in one style (2, 2.5 — never 2.5000 beside 2); None: that side is exact."""
    return "exact" if b is None else f"{b:g}"


def _sides(setting: tuple, bits_word: str = " bits", sep: str = ", ") -> str:
    """K 2 bits, V exact — never "v bits = None"."""
    _, k, v = setting
    return sep.join(
        f"{side} exact" if b is None else f"{side} {_bits(b)}{bits_word}" for side, b in (("K", k), ("V", v))
    )


def _tag(conf: Configuration) -> str:
    """Legend text: label (K 2/V exact)."""
    return f"{conf.label} ({_sides(conf.setting, '', '/')})"


BLOCK_TEXT = {
    "eval": "A block is one (layer, KV head, window) of held-out text; its value is the mean over its queries.",
    "perplexity": "A block is one window of a held-out document, run through the model with the compressed cache; "
    "its value is the mean over its scored tokens.",
    "niah": "A block is one needle prompt (context length, depth) built from held-out text.",
    "generate": "A block is one held-out prompt and its greedy continuation.",
}


def _block(row: dict) -> tuple:
    """The held-out block a row measures, by its task's block columns (results before `task`: attention)."""
    return tuple(row[c] for c in BLOCK_COLUMNS[row.get("task") or "eval"])


def _common_blocks(configs: list[Configuration]) -> set:
    """Blocks every evaluation of `configs` has, so that each unit averages the same windows everywhere."""
    return set.intersection(*({_block(r) for r in ev.rows} for c in configs for ev in c.evals))


def _unit_values(conf: Configuration, metric: str, by: tuple, blocks: set) -> dict[tuple, float]:
    """Per unit: the mean of `metric` over its blocks in `blocks`, averaged over the configuration's seeds."""
    per_seed = [unit_means([r for r in ev.rows if _block(r) in blocks], metric, by) for ev in conf.evals]
    return {u: nanmean(s[u] for s in per_seed) for u in per_seed[0]}


def _seed_means(conf: Configuration, metric: str) -> list[float]:
    """Each seed's mean of `metric` over all its blocks (`row_mean`)."""
    return [row_mean(ev.rows, metric) for ev in conf.evals]


def _overall(conf: Configuration, key: str) -> float | None:
    """A summary.json overall value averaged over seeds; None where the results do not have it."""
    values = [ev.summary["overall"].get(key) for ev in conf.evals]
    return None if None in values else nanmean(values)


def summary_table(configs: list[Configuration], metrics: list[str]) -> tuple[str, list[dict]]:
    header = ["configuration", "kv", "K bits", "V bits", "stored bits/coord (K+V)", "KV bytes/token", "seeds"]
    header += [f"{m}: mean ± seed SD" for m in metrics]
    rows, records = [], []
    for conf in configs:
        kv, k, v = conf.setting
        kv_bits = _overall(conf, "kv_bits_per_coordinate")
        kv_bytes = _overall(conf, "kv_bytes_per_token") or _overall(conf, "cache_bytes_per_token")
        row = [conf.label, kv, _bits(k), _bits(v), kv_bits, kv_bytes, len(conf.evals)]
        record = {
            "configuration": conf.label,
            "kv": kv,
            "k_bits": k,
            "v_bits": v,
            "kv_bits": kv_bits,
            "kv_bytes_per_token": kv_bytes,
            "seeds": conf.seeds,
        }
        for m in metrics:
            per_seed = _seed_means(conf, m)
            d = describe(per_seed)
            row.append(f"{_fmt(d['mean'])} ± {_fmt(d['sd'], 3) if len(per_seed) > 1 else '—†'}")
            record.update({f"{m}_mean": d["mean"], f"{m}_seed_sd": d["sd"], f"{m}_per_seed": per_seed})
        rows.append(row)
        records.append(record)
    text = _table(header, rows)
    if any(len(c.evals) == 1 for c in configs):
        text += "\n\n† One seed gives no seed-to-seed variance, so there is no SD."
    return text, records


def undefined_counts(configs: list[Configuration], metrics: list[str]) -> list[dict]:
    """Per configuration and metric, the blocks (over all seeds) where the metric is undefined (NaN): left out of
    every mean, so counted here."""
    records = []
    for conf in configs:
        for m in metrics:
            values = [r[m] for ev in conf.evals for r in ev.rows]
            undefined = sum(v != v for v in values)
            if undefined:
                records.append(
                    {"configuration": conf.label, "metric": m, "undefined": undefined, "blocks": len(values)}
                )
    return records


def _friedman_text(p: float, columns: list[list[float]]) -> str:
    """Friedman p, or why there is none."""
    complete = sum(not any(math.isnan(x) for x in unit) for unit in zip(*columns, strict=True))
    if len(columns) < 3:
        why = f" (Friedman needs ≥ 3 configurations; this setting has {len(columns)})"
    elif complete < 2:
        why = f" (Friedman needs ≥ 2 units with a value in every configuration; {complete} have one)"
    else:
        why = ""
    return f"Friedman p = {_fmt(p)}{why}"


def paired_tables(configs: list[Configuration], metrics: list[str], unit: str) -> tuple[str, list[dict]]:
    """Within each (kv, bits) setting, on unit values: Friedman across configurations, pairwise Wilcoxon
    with Holm over the pairs of one metric."""
    by = UNITS[unit][0]
    parts, records = [], []
    for setting, group in itertools.groupby(configs, key=lambda c: c.setting):
        group = list(group)
        if len(group) < 2:
            continue
        parts.append(f"### kv = {setting[0]}: {_sides(setting)}")
        blocks = _common_blocks(group)
        left_out = {_block(r) for c in group for ev in c.evals for r in ev.rows} - blocks
        if left_out:  # each unit must average the same windows in every configuration
            parts.append(
                f"{len(left_out)} block(s) are not in every configuration of this setting and are left out of "
                "its tests (the summary's means include them)."
            )
        for metric in metrics:
            values = [_unit_values(c, metric, by, blocks) for c in group]
            units = sorted(values[0], key=str)
            columns = [[v[u] for u in units] for v in values]
            p_friedman = friedman(columns)
            pairs = [
                (a, b, paired_difference(columns[i], columns[j]))
                for (i, a), (j, b) in itertools.combinations(enumerate(group), 2)
            ]
            # a pair of fewer than two units has no test: no p, and no place in the Holm family
            testable = [i for i, (_, _, p) in enumerate(pairs) if p["n"] >= 2]
            adjusted = [math.nan] * len(pairs)
            for i, p_adj in zip(testable, holm([pairs[i][2]["p"] for i in testable]), strict=True):
                adjusted[i] = p_adj
            rows = []
            for (a, b, p), p_adj in zip(pairs, adjusted, strict=True):
                ci = f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]"
                if p["n"] < 2:
                    p, tested = {**p, "p": math.nan}, ("— (n < 2: not testable)", "—")
                else:
                    tested = (p["p"], p_adj)
                rows.append([b.label, a.label, p["n"], p["median_diff"], ci, *tested])
                records.append(
                    {
                        "setting": list(setting),
                        "metric": metric,
                        "unit": unit,
                        "a": a.label,
                        "b": b.label,
                        **p,
                        "p_holm": p_adj,
                        "friedman_p": p_friedman,
                    }
                )
            better = "higher" if higher_is_better(metric) else "lower"
            parts.append(
                f"**{metric}** ({better} is better) on {len(units)} units; {_friedman_text(p_friedman, columns)}"
            )
            header = ["B", "A", "n (units)", "median B − A (over units)", "bootstrap 95 % CI of the median"]
            parts.append(_table([*header, "Wilcoxon p", "Holm p"], rows))
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


def colour_map(labels) -> dict[str, str]:
    """Configuration label → colour, decided once for every figure: a fixed palette in sorted-label order."""
    from matplotlib import colormaps, colors

    tab20 = colormaps["tab20"].colors
    palette = [colors.to_hex(c) for c in tab20[0::2] + tab20[1::2]]  # the ten strong colours first
    return {label: palette[i % len(palette)] for i, label in enumerate(sorted(set(labels)))}


def figures(
    configs: list[Configuration],
    metrics: list[str],
    out: Path,
    reference: str,
    unit: str,
    colours: dict[str, str],
) -> list[Path]:
    """Trade-off plots; every artist of a configuration has its colour and, as gid, its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(dict.fromkeys(c.setting for c in configs))}
    paths = []
    # one trade-off plot per headline metric present (attention: output cosine, KL; end to end: perplexity
    # increase, final hidden cosine, needle accuracy), else the first metric
    headline = ("output_cosine", "attention_kl", "nll_increase", "final_hidden_cosine", "found")
    for metric in [m for m in metrics if m in headline] or metrics[:1]:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        pts = []
        for conf in configs:
            x = _overall(conf, "kv_bytes_per_token") or _overall(conf, "cache_bytes_per_token")
            if x is None:  # generation rows carry no bytes: no trade-off to draw
                continue
            y = nanmean(_seed_means(conf, metric))
            pts.append((x, y))
            style = {"color": colours[conf.label], "marker": markers[conf.setting], "gid": conf.label}
            ax.scatter(x, y, s=40, label=_tag(conf), **style)
        if not pts:  # no configuration stores bytes (generation rows): no trade-off to draw
            plt.close(fig)
            continue
        ax.margins(x=0.1, y=0.1)
        front = _pareto(pts, higher_is_better(metric))
        ax.plot(*zip(*front, strict=True), "k--", lw=1, marker="o", mfc="none", ms=13, label="Pareto front")
        _finish_axes(
            ax,
            "K+V bytes per token (stored)",
            f"{metric} (mean over blocks and seeds)",
            f"Quality vs memory: {metric}",
            8,
        )
        paths.append(_save(fig, out / f"pareto_{metric}.png"))

    metric = metrics[0]
    if all("layer" in ev.rows[0] for c in configs for ev in c.evals):  # attention rows: one per layer's block
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for conf in configs:
            rows = [r for ev in conf.evals for r in ev.rows]
            layers = sorted({r["layer"] for r in rows})
            means = [nanmean(r[metric] for r in rows if r["layer"] == la) for la in layers]
            style = {"color": colours[conf.label], "marker": markers[conf.setting], "gid": conf.label}
            ax.plot(layers, means, ms=4, label=_tag(conf), **style)
        _finish_axes(ax, "layer", f"{metric} (mean over blocks and seeds)", f"{metric} per layer", 7)
        paths.append(_save(fig, out / f"per_layer_{metric}.png"))

    fig, ax = plt.subplots(figsize=(11, 4.5))
    kv_modes = sorted({c.setting[0] for c in configs})
    for label, kv in sorted({(c.label, c.setting[0]) for c in configs}):
        # one line per configuration and kv mode (key-only and full-KV bits are different axes), dashed by mode
        linestyle = ["-", "--", ":", "-."][kv_modes.index(kv) % 4]
        group = sorted(
            (
                (c.setting[1] if c.setting[1] is not None else c.setting[2], c)
                for c in configs
                if (c.label, c.setting[0]) == (label, kv)
            ),
            key=lambda p: p[0],
        )
        seeds = [describe(_seed_means(c, metric)) for _, c in group]
        name = label if len(kv_modes) == 1 else f"{label}, kv={kv}"
        ax.errorbar(
            [bits for bits, _ in group],
            [s["mean"] for s in seeds],
            yerr=[s["sd"] for s in seeds],  # NaN with one seed: no bar
            marker="o",
            capsize=3,
            color=colours[label],
            linestyle=linestyle,
            label=name,
            gid=label,
        )
    _finish_axes(
        ax,
        "bits (keys, or values when only values are compressed)",
        f"{metric} (mean; bars: seed SD)",
        f"{metric} by bits",
        7,
    )
    paths.append(_save(fig, out / f"by_bits_{metric}.png"))

    by, diffs = UNITS[unit][0], []
    for conf in configs:
        ref = reference_for(conf, configs, reference)
        if ref is not None:
            blocks = _common_blocks([ref, conf])
            a, b = (_unit_values(c, metric, by, blocks) for c in (ref, conf))
            units = sorted(a, key=str)
            diffs.append((conf, paired_difference([a[u] for u in units], [b[u] for u in units])))
    if diffs:
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(diffs) + 1.8))
        for i, (conf, d) in enumerate(diffs):
            ax.errorbar(
                d["median_diff"],
                i,
                xerr=[[d["median_diff"] - d["ci_low"]], [d["ci_high"] - d["median_diff"]]],
                fmt="o",
                capsize=4,
                color=colours[conf.label],
                gid=conf.label,
            )
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(range(len(diffs)), [textwrap.fill(_tag(c), 48) for c, _ in diffs], fontsize=7)
        _finish_axes(
            ax,
            f"median over units of the paired difference in {metric} vs {reference} (bootstrap 95 % CI)",
            "",
            f"Against {reference} (same codec and bits), unit = {unit}",
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


# what may differ between a configuration and the reference it is drawn against: the rotation and its runs
_ROTATION_COLUMNS = {
    "rotation", "k_rotation", "v_rotation", "view", "options", "rotations_from", "fit", "fit_seed", "fit_config",
    "seed",
}  # fmt: skip


def _codec_options(columns: dict) -> str:
    """The codec's own options among the `options` column's (which holds the rotation's too)."""
    from ..registry import CODECS

    try:
        options = json.loads(columns.get("options") or "{}")
        names = CODECS[columns["codec"]].options
    except (KeyError, TypeError, ValueError):  # codecs per side: compare every option
        return str(columns.get("options"))
    return json.dumps({k: v for k, v in options.items() if k in names}, sort_keys=True)


def _same_but_rotation(a: Configuration, b: Configuration) -> bool:
    """Whether two configurations differ in nothing but their rotations (codec, its options, bits, cache
    layout, protocol, model and data all equal)."""
    ca, cb = a.evals[0].columns, b.evals[0].columns
    keys = (set(ca) | set(cb)) - _ROTATION_COLUMNS
    return all(ca.get(k) == cb.get(k) for k in keys) and _codec_options(ca) == _codec_options(cb)


def reference_for(conf: Configuration, configs: list[Configuration], reference: str) -> Configuration | None:
    """The configuration that differs from `conf` only in using the `reference` rotation (None if none, or
    if `conf` is one)."""
    if set(conf.evals[0].rotations.values()) == {reference}:
        return None
    refs = [
        r
        for r in configs
        if set(r.evals[0].rotations.values()) == {reference} and _same_but_rotation(r, conf)
    ]
    return refs[0] if refs else None


def build_report(
    runs: str | Path,
    out: Path,
    metrics: list[str],
    reference: str = "random_haar",
    command: str = "",
    wandb: dict | None = None,
    unit: str | None = None,
) -> Path:
    """`unit=None` pairs results by source document (the independent units: every layer and KV head of one
    document reads its text), by (layer, KV head) only where rows name no document."""
    if unit is not None and unit not in UNITS:
        raise ReportError(f"unit={unit}: choose one of {sorted(UNITS)}")
    evals, missing = collect(runs)
    unit = unit or ("document" if all("document" in ev.rows[0] for ev in evals) else "layer_head")
    unknown = [m for m in metrics if m not in evals[0].rows[0]]
    if unknown:
        raise ReportError(
            f"report.metrics has {unknown}, which the results do not have; they have {sorted(evals[0].rows[0])}"
        )
    by, unit_text = UNITS[unit]
    lacking = [str(ev.folder) for ev in evals if any(c not in ev.rows[0] for c in by)]
    if lacking:
        raise ReportError(
            f"unit={unit} needs the column(s) {list(by)} in results.csv, which {len(lacking)} evaluations "
            f"lack (e.g. {lacking[0]}): use the other unit, or leave unit unset to choose by task"
        )
    configs = group_seeds(evals)
    rotations = sorted({r for c in configs for r in c.evals[0].rotations.values() if r})
    if reference not in rotations:
        log.warning(
            "reference=%s is no rotation of these results (%s): no figure against it", reference, rotations
        )
    colours = colour_map(c.label for c in configs)
    out.mkdir(parents=True, exist_ok=True)
    table, summary_records = summary_table(configs, metrics)
    undefined = undefined_counts(configs, metrics)
    paired, paired_records = paired_tables(configs, metrics, unit)
    pictures = figures(configs, metrics, out, reference, unit, colours)
    c = evals[0].columns
    text = [
        "# tqlab report",
        "",
        f"`{command}`" if command else "",
        "",
        f"{len(evals)} finished evaluations of model `{c['model']}`"
        + (f" on capture `{c['capture']}`" if c.get("capture") else "")
        + f" ({c['data']} text, test split) from `{runs}`: {len(configs)} configurations (evaluations that differ "
        "only in seed are one configuration measured with other random rotations or fits).",
        BLOCK_TEXT.get(c.get("task") or "eval", ""),
        "",
    ]
    if missing:
        text += ["**Unfinished jobs (not in this report):**", "", *[f"- {m}" for m in missing], ""]
    text += [
        "## Summary",
        "",
        "Each seed's value is its mean over all blocks; shown is the mean over seeds ± the seed-to-seed SD.",
        "",
        table,
        "",
    ]
    if undefined:
        text += [
            "Values undefined on a block (NaN) are left out of every mean and test; where there were any:",
            "",
            _table(
                ["configuration", "metric", "undefined blocks", "blocks"],
                [[u["configuration"], u["metric"], u["undefined"], u["blocks"]] for u in undefined],
            ),
            "",
        ]
    text += [
        "## Paired comparisons",
        "",
        f"Unit = {unit_text}, averaged over seeds and over the windows every configuration of the setting has; "
        f"n counts units. {UNIT_INDEPENDENCE[unit]} For B − A: the median over units with a percentile-bootstrap "
        "95 % CI, the Wilcoxon signed-rank p, and Holm-adjusted p over the pairs of one metric and setting.",
        "",
        paired,
        "",
        "## Figures",
        "",
    ]
    text += [f"![{p.stem}]({p.name})" for p in pictures]
    report = out / "report.md"
    report.write_text("\n".join(text) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {
                "unit": unit,
                "unit_description": unit_text,
                "colours": colours,
                "summary": summary_records,
                "undefined": undefined,
                "paired": paired_records,
                "missing": missing,
            },
            indent=2,
            default=str,
        )
    )
    if wandb and wandb.get("mode", "disabled") != "disabled":
        config = {"runs": str(runs), "unit": unit}
        _to_wandb(wandb, out, summary_records, paired_records, pictures, config)
    log.info("report written to %s", report)
    return report


def _to_wandb(
    settings: dict, out: Path, summary: list[dict], paired: list[dict], pictures: list[Path], config: dict
) -> None:
    import wandb

    from ..wandb_run import finish_wandb

    run = wandb.init(
        project=settings.get("project", "tqlab"),
        mode=settings["mode"],
        dir=str(out),
        job_type="report",
        config=config,
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
