"""Find finished evaluations under a run or sweep folder, and say which jobs are missing."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from ..registry import RuleError
from ..results import read_results


class ReportError(RuleError):
    """A report request the results cannot serve (the apps print it as one line and exit 2)."""


@dataclasses.dataclass
class Evaluation:
    folder: Path
    summary: dict
    rows: list[dict]

    @property
    def columns(self) -> dict:
        return self.summary["columns"]

    @property
    def rotations(self) -> dict[str, str]:
        """Rotation label of each compressed side ("K", "V"); older results have one `rotation` for both."""
        c = self.columns
        found = {}
        for side in ("k", "v"):
            rotation = c.get(f"{side}_rotation", c.get("rotation"))
            if c[f"{side}_bits"] is not None and rotation is not None:
                found[side.upper()] = rotation
        return found

    @property
    def label(self) -> str:
        """codec · rotation[view] (K … / V … when the sides differ), and the train run of fitted rotations."""
        c = self.columns
        view = c.get("view")
        sides = {
            side: r + (f"[{view}]" if view and view != "vector" and "block_so8" in r else "")
            for side, r in self.rotations.items()
        }
        rot = (
            next(iter(sides.values()))
            if len(set(sides.values())) == 1
            else " / ".join(f"{side} {r}" for side, r in sides.items())
        )
        if c.get("fit"):  # fitted rotations: what was fitted, not which run (seeds are grouped)
            rot += f" ({c['fit']}" + (f", config {c['fit_config'][:6]})" if c.get("fit_config") else ")")
        elif c.get("rotations_from"):  # results written before the `fit` column
            rot += f" ({Path(c['rotations_from']).name})"
        options = json.loads(c.get("options") or "{}")
        codec = c["codec"] + (" centered" if options.get("center") else "")
        codec += " query-metric keys" if options.get("key_metric") == "query" else ""
        codec += " norm-corrected" if options.get("norm_correction") else ""
        codec += " unbiased decode" if options.get("unbiased") else ""
        codec += " no norm" if options.get("scale") == "none" else ""
        codec += _codec_settings(c["codec"], options)
        label = f"{codec} · {rot}" if rot else codec
        return label + self.layout_suffix

    @property
    def layout_suffix(self) -> str:
        """What the cache kept exact, when anything: " +prefill exact +exact layers [0] +4 sinks +64 recent"."""
        c, parts = self.columns, []
        if c.get("protocol") == "prefill_exact":
            parts.append("prefill exact")
        if c.get("exact_layers") not in (None, "[]"):
            parts.append(f"exact layers {c['exact_layers']}")
        if c.get("sink_tokens"):
            parts.append(f"{c['sink_tokens']} sinks")
        if c.get("recent_window"):
            parts.append(f"{c['recent_window']} recent")
        return "".join(f" +{p}" for p in parts)

    @property
    def setting(self) -> tuple:
        """What must match for two evaluations to be compared pairwise: kv mode and bits."""
        c = self.columns
        return (c["kv"], c["k_bits"], c["v_bits"])


@dataclasses.dataclass
class Configuration:
    """Evaluations that differ only in `seed`: one configuration measured with other random rotations/fits."""

    evals: list[Evaluation]

    @property
    def label(self) -> str:
        return self.evals[0].label

    @property
    def setting(self) -> tuple:
        return self.evals[0].setting

    @property
    def seeds(self) -> list:
        return [seed_of(e) for e in self.evals]


# Columns that differ between the seeds of one configuration: its random rotations, or its fit's run
SEED_COLUMNS = ("seed", "fit_seed", "rotations_from")


def seed_of(ev: Evaluation):
    """The evaluation's seed, or (fit seed, evaluation seed) for fitted rotations."""
    c = ev.columns
    return c["seed"] if c.get("fit_seed") is None else (c["fit_seed"], c["seed"])


def group_seeds(evals: list[Evaluation]) -> list[Configuration]:
    """Configurations (sorted by setting and label), each with its evaluations sorted by seed."""
    groups: dict[str, list[Evaluation]] = {}
    for ev in evals:
        key = json.dumps(
            {k: v for k, v in ev.columns.items() if k not in SEED_COLUMNS}, sort_keys=True, default=str
        )
        groups.setdefault(key, []).append(ev)
    configs = []
    for group in groups.values():
        group.sort(key=lambda e: str(seed_of(e)))
        seeds = [seed_of(e) for e in group]
        if len(set(seeds)) < len(seeds):  # a re-run would count as a second seed and shrink the SD
            raise ReportError(
                f"{group[0].label} is evaluated more than once with the same seed ({', '.join(str(e.folder) for e in group)}): "
                "report one folder of each"
            )
        configs.append(Configuration(group))
    configs.sort(key=lambda c: (c.setting, c.label))
    for a, b in itertools.pairwise(configs):  # tables and colours are keyed by label within a setting
        if (a.setting, a.label) == (b.setting, b.label):
            differ = sorted(
                k for k in a.evals[0].columns if a.evals[0].columns[k] != b.evals[0].columns.get(k)
            )
            raise ReportError(f"two configurations are both labelled {a.label}; they differ in {differ}")
    return configs


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
                listed = (  # Hydra's YAML list of the job's overrides, on one line
                    " ".join(line.removeprefix("- ").strip() for line in overrides.read_text().splitlines())
                    if overrides.exists()
                    else "no summary.json"
                )
                missing.append(f"{job.name}: {listed}")
            continue
        if folder in seen:
            continue
        seen.add(folder)
        found.append(Evaluation(folder, *read_results(folder)))


def _codec_settings(codec: str, options: dict) -> str:
    """The settings that tell two configurations of a tiered codec apart, for its label."""
    if codec == "protected_channels":  # its tiers: exact groups, high groups at their bits, residual rank
        rank = f", rank {options['rank']}" if options["rank"] else ""
        return (
            f" ({options['exact_groups']} exact, {options['high_groups']}×{options['high_bits']}b{rank},"
            f" by {options['ranking']})"
        )
    if codec == "relevance_gated":  # its gate: which share of keys, at which bits, how chosen
        trim = f", trim {options['trim']}" if options["trim"] else ""
        damping = f", half-life {options['half_life']}" if options["half_life"] else ""
        return f" ({options['gate']} {options['share']:g} at {options['high_bits']}b{trim}{damping})"
    return ""
