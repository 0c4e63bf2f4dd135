"""The work behind the command-line apps, as plain functions of a config (no Hydra inside).

Tests compose a config and call these directly; `capture.py` and friends are thin `@hydra.main` wrappers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from .config import ConfigError, capture_section, data_section, model_section

log = logging.getLogger(__name__)


def capture(cfg: DictConfig) -> Path:
    """Create, resume or reuse the capture that `cfg` describes; returns its folder."""
    model, data, settings = model_section(cfg), data_section(cfg), capture_section(cfg)
    if data["source"] == "synthetic":
        raise ConfigError(
            "data=synthetic is generated on the fly and needs no capture; pick data=wiki or another text"
        )
    from .capture.run import capture_spec, run_capture

    spec = capture_spec(model, data, settings["layers"], settings["store_dtype"], settings["shard_size"])
    root = Path(settings["root"]).expanduser().resolve()
    return run_capture(spec, root, device=model.get("device", "cpu"), progress=cfg.get("progress", True))


def kv_source(cfg: DictConfig):
    """The KV source a run reads: synthetic KV, or the capture (made first when it is missing)."""
    data = data_section(cfg)
    if data["source"] == "synthetic":
        from .data import SyntheticKV

        return SyntheticKV(**{k: v for k, v in data.items() if k != "source"})
    from .capture.store import CaptureStore

    return CaptureStore(capture(cfg))
