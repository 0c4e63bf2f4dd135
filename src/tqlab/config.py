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


def store_section(cfg: DictConfig) -> dict:
    store = to_dict(cfg, "store")
    check_choice("store.dtype", store["dtype"], STORE_DTYPES)
    check_int("store.shard_size", store["shard_size"], 1)
    layers = store.get("layers")
    if layers is not None and (
        not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers)
    ):
        raise ConfigError(f"store.layers={layers!r} must be null or a list of layer indices")
    return store


# -- train / eval ----------------------------------------------------------------------------------------
ROTATION_PARTS = ("identity", "random_haar", "fast_hadamard", "block_so8_static", "block_so8_learned")
VIEWS = ("vector", "spinor_plus", "spinor_minus")
CODECS = ("turboquant_mse", "turboquant_prod", "int8_block", "int4_block", "kivi")
FIXED_BITS = {"int8_block": (8,), "int4_block": (4,), "kivi": (2, 4)}
OBJECTIVES = ("mse", "logits", "attention")
TARGETS = ("key", "value")
HEAD_DIMS = {"smollm2-135m": 64, "qwen2.5-coder-1.5b": 128}  # offline models, known before loading


def rotation_section(cfg: DictConfig) -> dict:
    rot = to_dict(cfg, "rotation")
    parts = str(rot["name"]).split("+")
    for part in parts:
        check_choice("rotation.name (each '+' part)", part, ROTATION_PARTS)
    if "block_so8_learned" in parts:
        check_choice("rotation.view", rot.get("view"), VIEWS)
        check_choice("rotation.init", rot.get("init"), ("random", "identity"))
    rot["learned"] = "block_so8_learned" in parts
    return rot


def target_bits(cfg: DictConfig) -> dict:
    """Bits per compressed target ({"key": b or None, "value": b or None}), validated for the codec."""
    kv = to_dict(cfg, "kv")
    compress = kv.get("compress") or []
    if not compress or any(t not in TARGETS for t in compress):
        raise ConfigError(f"kv.compress={compress} must be a non-empty subset of {list(TARGETS)}")
    codec = to_dict(cfg, "codec")["name"]
    check_choice("codec", codec, CODECS)
    out = {}
    for target, key in (("key", "k_bits"), ("value", "v_bits")):
        if target not in compress:
            out[target] = None
            continue
        bits = cfg.get(key) if cfg.get(key) is not None else cfg.get("bits")
        name = key if cfg.get(key) is not None else "bits"
        if isinstance(bits, bool) or not isinstance(bits, (int, float)):
            raise ConfigError(f"{name}={bits!r} must be a number")
        if codec in FIXED_BITS:
            if bits not in FIXED_BITS[codec]:
                raise ConfigError(
                    f"{name}={bits} is not allowed for codec={codec}: choose from {list(FIXED_BITS[codec])}"
                )
        else:
            low = 2 if codec == "turboquant_prod" else 1
            if not low <= bits <= 8:
                raise ConfigError(f"{name}={bits} is out of range {low}..8 for codec={codec}")
        out[target] = int(bits) if float(bits).is_integer() else float(bits)
    return out


def check_rotation_and_codec(rot: dict, codec: str, bits: dict) -> None:
    if codec in ("int8_block", "kivi") and rot["name"] != "identity":
        raise ConfigError(f"rotation={rot['name']} does not apply to codec={codec}: use rotation=identity")
    if codec == "int4_block" and rot["name"] not in ("identity", "fast_hadamard"):
        raise ConfigError(f"codec=int4_block takes rotation=identity or fast_hadamard, got {rot['name']}")
    if rot["learned"]:
        if codec not in ("turboquant_mse", "turboquant_prod"):
            raise ConfigError(f"learned rotations are fitted for turboquant codecs, not codec={codec}")
        fractional = [t for t, b in bits.items() if b is not None and not float(b).is_integer()]
        if fractional:
            raise ConfigError(
                f"learned rotations are fitted at integer bits; {fractional} bits are fractional"
            )


def check_head_dim(rotation_name: str, head_dim: int) -> None:
    parts = rotation_name.split("+")
    if any(p.startswith("block_so8") for p in parts) and head_dim % 8:
        raise ConfigError(
            f"rotation={rotation_name} needs head_dim divisible by 8; this model has {head_dim}"
        )
    if "fast_hadamard" in parts and head_dim & (head_dim - 1):
        raise ConfigError(
            f"rotation={rotation_name} needs a power-of-two head_dim; this model has {head_dim}: use random_haar"
        )


def known_head_dim(cfg: DictConfig) -> int | None:
    data = to_dict(cfg, "data")
    if data["source"] == "synthetic":
        return data["head_dim"]
    return HEAD_DIMS.get(to_dict(cfg, "model")["name_or_path"])


def fit_section(cfg: DictConfig) -> dict:
    fit = to_dict(cfg, "fit")
    check_choice("fit.objective", fit["objective"], OBJECTIVES)
    if not isinstance(fit["lr"], (int, float)) or fit["lr"] <= 0:
        raise ConfigError(f"fit.lr={fit['lr']!r} must be a positive number")
    check_int("fit.batch_size", fit["batch_size"], 1)
    check_int("fit.patience", fit["patience"], 0)
    return fit


def run_sections(cfg: DictConfig) -> dict:
    """Everything a train or eval run needs, validated together before any compute."""
    sections = {"model": model_section(cfg), "data": data_section(cfg), "store": store_section(cfg)}
    rot = rotation_section(cfg)
    bits = target_bits(cfg)
    codec = to_dict(cfg, "codec")
    check_rotation_and_codec(rot, codec["name"], bits)
    head_dim = known_head_dim(cfg)
    if head_dim is not None:
        check_head_dim(rot["name"], head_dim)
    return sections | {"rotation": rot, "bits": bits, "codec": codec}
