"""Statistics for reports: descriptive summaries, unit means and paired tests.

scipy does the tests. Windows of one (layer, head) are not independent, so the pairs are units — the
mean of each (layer, head) or document under two configurations — not single blocks.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..results import PER_TOKEN


def describe(values) -> dict:
    """n, mean, SD, SEM and the 95 % Student-t confidence interval of the mean (NaNs dropped)."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    n = len(x)
    if n == 0:
        return {
            "n": 0,
            "mean": math.nan,
            "sd": math.nan,
            "sem": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
        }
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    sem = sd / math.sqrt(n) if n > 1 else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * sem) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "sem": sem, "ci_low": mean - half, "ci_high": mean + half}


def nanmean(values, weights=None) -> float:
    """Mean without the NaNs (a metric undefined on a block), weighted by `weights` if given; NaN when nothing
    is left."""
    x = np.asarray(list(values), dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(list(weights), dtype=float)
    kept = ~np.isnan(x)
    return float((x[kept] * w[kept]).sum() / w[kept].sum()) if kept.any() else math.nan


def row_mean(rows, metric: str) -> float:
    """Mean of `metric` over rows; a per-token metric of rows that score several tokens each (perplexity
    windows, `results.PER_TOKEN`) weighted by their `tokens`, so that it stays per token across windows of
    different lengths."""
    weighted = metric in PER_TOKEN
    return nanmean((r[metric] for r in rows), (r.get("tokens", 1) if weighted else 1 for r in rows))


def unit_means(rows, metric: str, by: tuple[str, ...]) -> dict[tuple, float]:
    """Mean of `metric` over the rows of each unit, the rows that share the values of the `by` columns
    (`row_mean`)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in by), []).append(r)
    return {unit: row_mean(group, metric) for unit, group in groups.items()}


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); a p that is not a number stays
    NaN and is not in the family."""
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(tested)
    order = sorted(tested, key=lambda i: p_values[i])
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p_values[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def paired_difference(a, b, seed: int = 0, resamples: int = 2000) -> dict:
    """b − a over paired units: median difference with a bootstrap 95 % CI, and the Wilcoxon signed-rank p."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(invalid="ignore"):  # inf − inf is NaN, dropped next: no warning for what is handled
        d = b - a
    d = d[~np.isnan(d)]  # a unit undefined in either, or infinite in both (inf − inf)
    if len(d) < 2 or np.all(d == 0):
        return {
            "n": int(len(d)),
            "median_diff": float(np.median(d)) if len(d) else math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "p": 1.0,
        }
    boot = stats.bootstrap(
        (d,),
        np.median,
        confidence_level=0.95,
        n_resamples=resamples,
        random_state=np.random.default_rng(seed),
        method="percentile",
    )
    p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
    return {
        "n": int(len(d)),
        "median_diff": float(np.median(d)),
        "ci_low": float(boot.confidence_interval.low),
        "ci_high": float(boot.confidence_interval.high),
        "p": p,
    }


def friedman(columns: list) -> float:
    """Friedman test across k >= 3 configurations measured on the same units (rows with a NaN dropped)."""
    data = np.column_stack([np.asarray(c, dtype=float) for c in columns])
    data = data[~np.isnan(data).any(axis=1)]
    if data.shape[1] < 3 or len(data) < 2:
        return math.nan
    return float(stats.friedmanchisquare(*data.T).pvalue)
