"""Validation of the Hydra configuration, before any compute: errors name the key and the allowed values.

Only OmegaConf is needed here (no torch), so configs are checked in milliseconds.
"""

from __future__ import annotations

import dataclasses
import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from . import registry
from .kv.layout import CacheLayout
from .kv.spec import FittedRotations, KVQuantSpec
from .registry import RuleError

MODEL_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_LOADS = ("none", "8bit", "4bit")
DATA_SOURCES = ("wiki", "wikitext2", "text_file", "synthetic")
SYNTHETIC_KINDS = ("isotropic", "outliers")  # data=synthetic: KV with or without planted outlier key channels
STORE_DTYPES = ("float16", "bfloat16", "float32")
SPLITS = ("train", "validation", "test")


ConfigError = RuleError  # one error type for every configuration mistake, raised here and in the library


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
    device = str(model.get("device", "cpu"))
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"model.device={device!r} is not allowed; choose cpu, mps, cuda or cuda:<index>")
    if model["weight_load"] != "none" and not device.startswith("cuda"):
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
    if data["source"] == "synthetic":  # SyntheticKV's own checks would come after the results folder exists
        check_choice("data.kind", data.get("kind"), SYNTHETIC_KINDS)
        for key in ("num_layers", "num_heads", "num_kv_heads"):
            check_int(f"data.{key}", data.get(key), 1)
        check_int("data.head_dim", data.get("head_dim"), 8)
        check_int("data.n_outliers", data.get("n_outliers"), 0)
        if data["num_heads"] % data["num_kv_heads"]:
            raise ConfigError(
                f"data.num_heads={data['num_heads']} must be a multiple of data.num_kv_heads={data['num_kv_heads']}"
            )
        if data["n_outliers"] > data["head_dim"]:
            raise ConfigError(
                f"data.n_outliers={data['n_outliers']} exceeds data.head_dim={data['head_dim']}"
            )
    check_int("data.seed", data.get("seed"), 0)
    if data["source"] in ("wiki", "text_file"):  # the capture's own check would come after the results folder
        check_int("data.windows_per_document", data.get("windows_per_document"), 1)
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
        not isinstance(layers, list) or not layers or not all(isinstance(i, int) and i >= 0 for i in layers)
    ):
        raise ConfigError(
            f"store.layers={layers!r} must be null (every layer) or a non-empty list of layer indices"
        )
    return store


# -- train / eval ---------------------------------------------------------------------------------------
OBJECTIVES = ("mse", "logits", "attention")
EVAL_TASKS = ("eval", "perplexity", "niah", "generate")  # eval.py's; train.py's is "train"
HEAD_DIMS = {"smollm2-135m": 64, "qwen2.5-coder-1.5b": 128}  # offline models, known before loading


def known_head_dim(cfg: DictConfig) -> int | None:
    data = to_dict(cfg, "data")
    if data["source"] == "synthetic":
        return data["head_dim"]
    return HEAD_DIMS.get(to_dict(cfg, "model")["name_or_path"])


def fitted_rotations(cfg: DictConfig) -> FittedRotations | None:
    """The train run named by `rotations=` (a Hydra run folder or its results folder), or None."""
    if not cfg.get("rotations"):
        return None
    from .runs import results_of

    path = results_of(cfg.rotations) / "best.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"rotations={cfg.rotations}: no best.safetensors there; pass a finished train run folder"
        )
    return FittedRotations.read(path)


def kv_spec(cfg: DictConfig) -> KVQuantSpec:
    """The run's KVQuantSpec, validated as a whole (codec, bits, rotation, options, fitted rotations, and
    head_dim where it is known before loading the model)."""
    codec, rotation = to_dict(cfg, "codec"), to_dict(cfg, "rotation")
    return KVQuantSpec.create(
        codec.pop("name"),
        cfg.get("bits"),
        rotation.pop("name"),
        compress=tuple(to_dict(cfg, "kv").get("compress") or ()),
        k_bits=cfg.get("k_bits"),
        v_bits=cfg.get("v_bits"),
        k_codec=cfg.get("k_codec"),
        v_codec=cfg.get("v_codec"),
        codec_options=codec,
        rotation_options=rotation,
        fitted=fitted_rotations(cfg),
        model=to_dict(cfg, "model")["name_or_path"],
        head_dim=known_head_dim(cfg),
        seed=cfg.get("seed"),
    )


def fit_section(cfg: DictConfig) -> dict:
    fit = to_dict(cfg, "fit")
    check_choice("fit.objective", fit["objective"], OBJECTIVES)
    if isinstance(fit["lr"], bool) or not isinstance(fit["lr"], (int, float)) or not fit["lr"] > 0:
        raise ConfigError(f"fit.lr={fit['lr']!r} must be a positive number")
    check_int("fit.batch_size", fit["batch_size"], 1)
    check_int("fit.patience", fit["patience"], 0)
    check_int("fit.max_epochs", fit["max_epochs"], 1)
    check_choice("fit.per_head", fit["per_head"], (False, True))
    temperature = fit["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"fit.temperature={temperature!r} must be a positive number")
    return fit


def eval_section(cfg: DictConfig) -> dict:
    settings = to_dict(cfg, "eval")
    check_int("eval.batch_size", settings["batch_size"], 1)
    check_int("eval.top_k", settings["top_k"], 1)
    check_int("eval.calibration_sequences", settings["calibration_sequences"], 1)
    return settings


def check_environment(cfg: DictConfig) -> None:
    """What this machine must have for the run, checked before any compute (torch-free, so cheaply)."""
    import importlib.util
    import shutil
    from pathlib import Path

    model, data = to_dict(cfg, "model"), to_dict(cfg, "data")
    wants_gpu = str(model.get("device", "cpu")).startswith("cuda") or OmegaConf.select(
        cfg, "trainer.accelerator"
    ) in (
        "gpu",
        "cuda",
    )
    if wants_gpu and not (Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi")):
        raise ConfigError(
            "trainer=gpu / model.device=cuda need an NVIDIA GPU, and this machine has none: use trainer=cpu"
        )
    needs = {"datasets": data["source"] == "wikitext2", "bitsandbytes": model["weight_load"] != "none"}
    for package, needed in needs.items():
        if needed and importlib.util.find_spec(package) is None:
            why = "data=wikitext2" if package == "datasets" else f"model.weight_load={model['weight_load']}"
            raise ConfigError(f"{why} needs the package {package}: pip install {package}")


def end_to_end_section(cfg: DictConfig) -> dict:
    """The settings of a perplexity / niah / generate run (the model with the compressed cache)."""
    task = cfg.task
    settings = to_dict(cfg, task)
    if task == "perplexity":
        check_int("perplexity.context", settings["context"], 2)
        check_int("perplexity.stride", settings["stride"], 1)
        if settings["stride"] > settings["context"]:
            raise ConfigError(
                f"perplexity.stride={settings['stride']} must not exceed perplexity.context={settings['context']}"
            )
        check_int("perplexity.max_windows", settings["max_windows"], 1)
        check_int("perplexity.chunk_size", settings["chunk_size"], 1)
        if settings["prefill"] is not None:
            check_int("perplexity.prefill", settings["prefill"], 1)
            # a document's later window scores from context − stride on, and prefill_exact from the end of its
            # prompt: with more than one window per document (WikiText-2's one long document included)
            most = max(settings["context"] - settings["stride"], 1)
            several = cfg.data.source == "wikitext2" or cfg.data.get("windows_per_document", 1) > 1
            if cfg.cache.protocol == "prefill_exact" and several and settings["prefill"] > most:
                raise ConfigError(
                    f"perplexity.prefill={settings['prefill']} under cache.protocol=prefill_exact must not exceed "
                    f"perplexity.context − perplexity.stride = {most} (at least 1): the tokens between would be "
                    "scored by no window"
                )
    elif task == "niah":
        for key in ("contexts", "depths"):
            if not settings[key]:
                raise ConfigError(f"niah.{key}={list(settings[key])} must hold at least one value")
        for context in settings["contexts"]:
            check_int("niah.contexts[]", context, 32)
        if not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in settings["depths"]):
            raise ConfigError(f"niah.depths={settings['depths']} must be numbers in [0, 1]")
        if not str(settings["value"]).isdigit():
            raise ConfigError(f"niah.value={settings['value']!r} must be digits (scored by exact match)")
        check_int("niah.max_new_tokens", settings["max_new_tokens"], 1)
    else:
        for key in ("prompts", "prompt_len", "max_new_tokens"):
            check_int(f"generate.{key}", settings[key], 1)
    return settings


def cache_section(cfg: DictConfig) -> dict:
    """The compressed cache's layout (`cache.*`): its protocol and what it keeps exact."""
    settings = to_dict(cfg, "cache")
    keys = [f.name for f in dataclasses.fields(CacheLayout)]
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise ConfigError(f"cache.{unknown[0]} is not a cache setting: choose from {', '.join(keys)}")
    try:
        layout = CacheLayout(**{**settings, "exact_layers": tuple(settings.get("exact_layers") or ())})
    except RuleError as error:
        raise ConfigError(f"cache.{error}") from None
    return {**dataclasses.asdict(layout), "exact_layers": list(layout.exact_layers)}


def block_cache_section(cfg: DictConfig) -> dict:
    """task=eval replays captured blocks, where a cache's protected tokens mean its first tokens
    (`cache.sink_tokens`); the settings that need the model's own cache are refused."""
    layout = cache_section(cfg)
    defaults = dataclasses.asdict(CacheLayout())
    for key in ("protocol", "exact_layers", "recent_window"):
        if layout[key] != (list(defaults[key]) if key == "exact_layers" else defaults[key]):
            raise ConfigError(
                f"cache.{key}={layout[key]} applies to task=perplexity, niah and generate (the model with "
                "its cache); task=eval replays captured blocks and keeps only cache.sink_tokens exact"
            )
    return layout


def run_sections(cfg: DictConfig) -> dict:
    """Everything a train or eval run needs, validated together before any compute or folder."""
    check_choice("task", cfg.get("task"), EVAL_TASKS if "eval" in cfg else ("train",))
    sections = {"model": model_section(cfg), "data": data_section(cfg), "store": store_section(cfg)}
    sections["spec"] = kv_spec(cfg)
    if cfg.task == "train":
        sections["fit"] = fit_section(cfg)
    else:
        sections["eval"] = eval_section(cfg)
    if cfg.task == "eval":
        sections["cache"] = block_cache_section(cfg)
    if cfg.task in ("perplexity", "niah", "generate"):
        if sections["data"]["source"] == "synthetic":
            raise ConfigError(
                f"task={cfg.task} runs the model on text: pick data=wiki, text_file or wikitext2"
            )
        sections["end_to_end"] = end_to_end_section(cfg)
        sections["cache"] = cache_section(cfg)
    fitted = next((s.rotation.fitted for s in sections["spec"].sides().values() if s.rotation.fitted), None)
    layers = sections["store"].get("layers")
    fit_layers = fitted.facts.get("layers") if fitted is not None else None
    if layers is not None and fit_layers is not None and not set(layers) <= set(fit_layers):
        raise ConfigError(
            f"store.layers={layers} includes layers {sorted(set(layers) - set(fit_layers))} that "
            f"rotations={cfg.rotations} has no rotations for; it was fitted on layers {fit_layers}"
        )
    model_layers = (
        fitted.facts.get("model_layers") if fitted is not None else None
    )  # older fits: after loading
    if cfg.task == "eval" and layers is None and model_layers and set(range(model_layers)) - set(fit_layers):
        raise ConfigError(
            f"store.layers=null evaluates all {model_layers} layers, but rotations={cfg.rotations} was fitted on "
            f"layers {fit_layers}: set store.layers={list(fit_layers)}"
        )
    if cfg.task == "train":
        check_fit_codec(sections["spec"])
    return sections


def check_fit_codec(spec: KVQuantSpec) -> None:
    """train.py fits each side's rotation under plain TurboQuant-MSE at the codec's Stage-1 bits, around the
    train mean under codec.center: every other codec option would be recorded in the fit and never used."""
    for side in spec.sides().values():
        if not registry.codec_rule(side.codec.name).trainable:
            raise ConfigError(
                "train.py fits rotations for codecs that take one; this codec has a fixed one: use eval.py"
            )
        defaults = registry.codec_options(side.codec.name, {})
        unused = [(k, v) for k, v in side.codec.options if k != "center" and defaults.get(k) != v]
        if unused:
            key, value = unused[0]
            raise ConfigError(
                f"codec.{key}={value!r} is not used by train.py, which fits under plain TurboQuant-MSE at the "
                "codec's Stage-1 bits (of the codec options only codec.center); set it when evaluating "
                "(eval.py), or drop it"
            )
