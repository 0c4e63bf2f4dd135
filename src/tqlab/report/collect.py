"""Find finished evaluations under a run or sweep folder, and say which jobs are missing."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path


class ReportError(ValueError):
    pass


@dataclasses.dataclass
class Evaluation:
    folder: Path
    summary: dict
    rows: list[dict]

    @property
    def label(self) -> str:
        """codec · rotation[view], and for fitted rotations the train run they came from."""
        c = self.summary["columns"]
        view = c.get("view")
        rot = c["rotation"] + (
            f"[{view}]" if view and view != "vector" and "block_so8" in c["rotation"] else ""
        )
        if c.get("rotations_from"):
            rot += f" ({Path(c['rotations_from']).name})"
        return f"{c['codec']} · {rot}"

    @property
    def setting(self) -> tuple:
        """What must match for two evaluations to be compared pairwise: kv mode and bits."""
        c = self.summary["columns"]
        return (c["kv"], c["k_bits"], c["v_bits"])


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


def collect(paths) -> tuple[list[Evaluation], list[str]]:
    """(finished evaluations, descriptions of unfinished jobs) under `paths` (one or a list): eval results
    folders, Hydra run folders (with their `result` link) or multirun folders of jobs."""
    found, missing, seen = [], [], set()
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        _collect_one(Path(path), found, missing, seen)
    if not found:
        raise ReportError(f"no finished evaluation (summary.json) under {paths}")
    for key in ("capture", "model"):
        values = {e.summary["columns"][key] for e in found}
        if len(values) > 1:
            raise ReportError(
                f"runs={paths} mixes evaluations of different {key}s {sorted(map(str, values))}: "
                "report each on its own (comparisons need the same held-out blocks)"
            )
    return found, missing


def _collect_one(path: Path, found: list, missing: list, seen: set) -> None:
    if not path.exists():
        raise ReportError(f"runs={path} does not exist")
    candidates = (
        [path]
        if (path / "summary.json").exists() or (path / "result").exists()
        else sorted(p for p in path.iterdir() if p.is_dir())
    )
    for job in candidates:
        folder = (job / "result").resolve() if (job / "result").exists() else job
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            if (job / ".hydra").is_dir() or (job / "result").is_symlink():
                overrides = job / ".hydra" / "overrides.yaml"
                missing.append(
                    f"{job.name}: {overrides.read_text().strip() if overrides.exists() else 'no summary.json'}"
                )
            continue
        if folder in seen:
            continue
        seen.add(folder)
        with open(folder / "results.csv", newline="") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        found.append(Evaluation(folder, json.loads(summary_file.read_text()), rows))
