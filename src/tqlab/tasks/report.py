"""report.py's task: statistics, tables and figures of finished evaluations."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import to_dict


def report(cfg: DictConfig) -> Path:
    """report.md (+ figures, report.json, W&B) for the evaluations under cfg.runs; returns report.md."""
    from ..report.build import build_report
    from ..runs import output_dir

    settings = to_dict(cfg, "wandb") if cfg.get("wandb") else {"mode": "disabled"}
    command = (
        "python report.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("report.py") else ""
    )
    runs = OmegaConf.to_container(cfg.runs) if OmegaConf.is_list(cfg.runs) else cfg.runs
    return build_report(
        runs, output_dir(cfg), list(cfg.metrics), cfg.reference, command, settings, unit=cfg.unit
    )
