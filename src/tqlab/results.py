"""The one results schema: every evaluation writes, and report.py reads, a long table of rows
(config columns + block columns + metric columns) and a summary.json beside it.

Config columns come from `KVQuantSpec.columns()` plus where the numbers came from; block columns say which
held-out block a row measures (pairs across configurations are matched on them); metric columns are named
in METRICS with their direction, so a report never needs to know which task produced a row.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

CONFIG_COLUMNS = (
    "task", "protocol", "model", "data", "capture", "codec", "kv", "k_bits", "v_bits", "k_rotation", "v_rotation", "view",
    "options", "rotations_from", "fit", "fit_seed", "fit_config", "seed",
)  # fmt: skip
# what one row measures, per task: rows of two configurations pair up on these
BLOCK_COLUMNS = {
    "eval": ("layer", "kv_head", "sequence", "document"),  # attention over captured blocks
    "perplexity": ("document", "window"),
    "generate": ("document",),  # one prompt per document
    "niah": ("document", "context", "depth"),
}
# A perplexity window's means over its scored tokens (its `tokens` column): across windows, weighted by them
PER_TOKEN = (
    "nll",
    "nll_reference",
    "nll_increase",
    "next_token_kl",
    "next_token_top1",
    "final_hidden_cosine",
)
# never parsed as numbers: a document titled "1984" or a capture hash of digits stays text
TEXT_COLUMNS = (
    "task",
    "protocol",
    "model",
    "data",
    "capture",
    "fit_config",
    "codec",
    "kv",
    "k_rotation",
    "v_rotation",
    "view",
    "options",
    "rotations_from",
    "fit",
    "exact_layers",
    "settings",
    "document",
)
# metric → True when higher is better; top-k overlap columns are named top{k}_overlap (higher is better)
METRICS = {
    "logit_cosine": True,
    "logit_correlation": True,
    "output_cosine": True,
    "output_rel_error": False,
    "attention_kl": False,
    "top1_agreement": True,
    "spearman": True,
    "key_rel_mse": False,
    "value_rel_mse": False,
    "key_bits_per_coordinate": False,
    "value_bits_per_coordinate": False,
    "kv_bits_per_coordinate": False,
    "kv_bytes_per_token": False,
    # end to end, with the compressed cache in the model
    "nll": False,
    "nll_reference": False,
    "nll_increase": False,
    "next_token_kl": False,
    "next_token_top1": True,
    "final_hidden_cosine": True,
    "cache_bytes_per_token": False,
    "reference_bytes_per_token": False,
    "agreement": True,
    "divergence": True,
    "found": True,
    "found_reference": True,
}


def higher_is_better(metric: str) -> bool:
    if metric.startswith("top") and metric.endswith("_overlap"):
        return True
    if metric not in METRICS:
        raise ValueError(
            f"{metric!r} is not a results metric; choose from {sorted(METRICS)} or top<k>_overlap"
        )
    return METRICS[metric]


def write_results(folder: Path, rows: list[dict], summary: dict, task: str = "eval") -> dict:
    """results.csv (sorted by block) and summary.json with per-layer and per-(layer, head) means; summary.json
    is written last and marks the run finished. Returns the full summary."""
    blocks = BLOCK_COLUMNS[task]
    rows = sorted(rows, key=lambda r: tuple(str(r[c]) if c == "document" else r[c] for c in blocks))
    columns = list(rows[0])
    missing = [c for c in (*CONFIG_COLUMNS, *blocks) if c not in columns]
    if missing:
        raise ValueError(f"result rows lack the schema's columns {missing}")
    _atomic(folder / "results.csv", _csv(rows, columns))
    metric_names = [k for k in summary["overall"] if k in columns]

    def means_by(key) -> dict:
        groups: dict = {}
        for r in rows:
            groups.setdefault(key(r), []).append(r)
        return {g: {m: _nanmean([r[m] for r in block]) for m in metric_names} for g, block in groups.items()}

    if task == "eval":
        summary = {
            **summary,
            "per_layer": means_by(lambda r: r["layer"]),
            "per_head": means_by(lambda r: f"{r['layer']}.{r['kv_head']}"),  # "layer.kv_head"
        }
    _atomic(folder / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    """(summary, rows) of a finished evaluation, numbers parsed back from the CSV."""
    with open(folder / "results.csv", newline="") as f:
        rows = [
            {k: v if k in TEXT_COLUMNS else _number(v) for k, v in row.items()} for row in csv.DictReader(f)
        ]
    return json.loads((folder / "summary.json").read_text()), rows


def _csv(rows: list[dict], columns: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _atomic(path: Path, text: str) -> None:
    import os
    import tempfile

    # a fresh, exclusively created temporary in the target folder: never follows a planted link
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _number(value: str):
    if value in ("", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else math.nan
