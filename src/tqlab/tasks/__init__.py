"""The work behind the command-line apps, as plain functions of a config (no Hydra inside).

Tests compose a config and call these directly; `capture.py` and friends are thin `@hydra.main` wrappers.
`train` and `evaluate` return an `Outcome` (results folder + metrics), so a Hydra sweeper can optimise a
metric (`optimized_metric=`).
"""

from .capture import capture
from .common import Outcome, kv_source
from .evaluate import evaluate
from .report import report
from .train import train

__all__ = ["Outcome", "capture", "evaluate", "kv_source", "report", "train"]
