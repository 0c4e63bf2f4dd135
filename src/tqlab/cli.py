"""What the command-line apps share: user errors as one line, Ctrl-C as one line, the sweeper's metric."""

from __future__ import annotations

import logging
import os
import sys

from .registry import RuleError

log = logging.getLogger("tqlab")


def run_app(task, cfg):
    """Run `task(cfg)`. A configuration mistake prints one line (key, allowed values, fix) and exits 2 —
    `HYDRA_FULL_ERROR=1` keeps the traceback for developers; Ctrl-C says how to resume and exits 130.
    Returns the metric `optimized_metric=` names (for Hydra sweepers such as Optuna), or None."""
    try:
        outcome = task(cfg)
    except RuleError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume where it stopped", file=sys.stderr)
        sys.exit(130)
    objective = getattr(outcome, "objective", None)
    return objective(cfg.get("optimized_metric")) if objective else None
