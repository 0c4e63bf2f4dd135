"""capture.py's task: create, resume or reuse a capture."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..config import ConfigError, check_environment, data_section, model_section, store_section


def capture(cfg: DictConfig) -> Path:
    """Create, resume or reuse the capture that `cfg` describes; returns its folder."""
    model, data, settings = model_section(cfg), data_section(cfg), store_section(cfg)
    check_environment(cfg)
    if data["source"] == "synthetic":
        raise ConfigError(
            "data=synthetic is generated on the fly and needs no capture; pick data=wiki or another text"
        )
    from ..capture.run import capture_spec, run_capture

    spec = capture_spec(model, data, settings["layers"], settings["dtype"], settings["shard_size"])
    root = Path(settings["root"]).expanduser().resolve()
    return run_capture(spec, root, device=model.get("device", "cpu"), progress=cfg.get("progress", True))
