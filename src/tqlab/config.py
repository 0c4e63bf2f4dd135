"""Validation of the Hydra configuration, before any compute: errors name the key and the allowed values.

Only OmegaConf is needed here (no torch), so configs are checked in milliseconds.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

MODEL_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_LOADS = ("none", "8bit", "4bit")
DATA_SOURCES = ("wiki", "wikitext2", "text_file", "synthetic")
STORE_DTYPES = ("float16", "bfloat16", "float32")
SPLITS = ("train", "validation", "test")


class ConfigError(ValueError):
    pass


def to_dict(cfg: DictConfig, key: str) -> dict:
    """The resolved section `key` as a plain dict; a missing mandatory value (???) is named."""
    try:
        return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{key}.{err.key} is required (it is ??? in the config): set it on the command line"
        ) from err


def check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose from {list(allowed)}")


def check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def model_section(cfg: DictConfig) -> dict:
    model = to_dict(cfg, "model")
    check_choice("model.dtype", model["dtype"], MODEL_DTYPES)
    check_choice("model.weight_load", model["weight_load"], WEIGHT_LOADS)
    if model["weight_load"] != "none" and not str(model.get("device", "cpu")).startswith("cuda"):
        raise ConfigError(
            f"model.weight_load={model['weight_load']} needs model.device=cuda (bitsandbytes is CUDA-only)"
        )
    return model


def data_section(cfg: DictConfig) -> dict:
    data = to_dict(cfg, "data")
    check_choice("data.source", data["source"], DATA_SOURCES)
    check_int("data.seq_len", data["seq_len"], 2)
    sequences = data.get("sequences") or {}
    if set(sequences) != set(SPLITS):
        raise ConfigError(f"data.sequences={sequences} must give a count for each of {list(SPLITS)}")
    for split in SPLITS:
        check_int(f"data.sequences.{split}", sequences[split], 1)
    fractions = data.get("split_fractions")
    if data["source"] in ("wiki", "text_file"):
        if not fractions or len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
            raise ConfigError(f"data.split_fractions={fractions} must be three positive numbers summing to 1")
    return data


def capture_section(cfg: DictConfig) -> dict:
    capture = to_dict(cfg, "capture")
    check_choice("capture.store_dtype", capture["store_dtype"], STORE_DTYPES)
    check_int("capture.shard_size", capture["shard_size"], 1)
    layers = capture.get("layers")
    if layers is not None and (
        not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers)
    ):
        raise ConfigError(f"capture.layers={layers!r} must be null or a list of layer indices")
    return capture
