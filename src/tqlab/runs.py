"""Where a run's results go, and the guarantees around them.

Results live in `<results_root>/<task>/<fingerprint>/`, named by a hash of the resolved configuration
(minus settings that do not change the numbers: loggers, progress bars, paths, device placement). So:
- re-running a finished configuration — e.g. a killed sweep started again — finds its results and skips;
- an unfinished one resumes in place (train: from its last saved rotations);
- two processes never write the same folder: the first holds an OS lock (flock) on `lock` and any other
  is refused; the lock dies with its process, so a killed run never blocks its rerun.
Hydra's own output folder (logs, .hydra/) gets a relative `result` link to the results folder.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # omegaconf loads where a DictConfig is resolved: `numeric_settings` needs none
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

# What cannot change a run's numbers: where it runs, how it logs, how many blocks go in one step.
# `rotations` (a path) is fingerprinted by the sha256 of the file it names, passed as `extra`.
_NOT_FINGERPRINTED = {
    "hydra", "logger", "progress", "output_dir", "results_root", "resume", "rotations", "optimized_metric",
}  # fmt: skip
_TRAINER_PLACEMENT = {"accelerator", "devices", "strategy"}
# sections only other tasks read (a shared debug preset may set the other app's section too)
_TASK_SECTIONS = {"fit", "eval", "perplexity", "niah", "generate", "cache"}
END_TO_END = ("perplexity", "niah", "generate")
_READS = {
    "train": {"fit"},
    "eval": {"eval", "cache"},
    **{task: {"eval", task, "cache"} for task in END_TO_END},
}


class RunLocked(RuntimeError):
    pass


def resolved(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


# options added after runs existed: left unset they do not change those runs' fingerprints
_UNSET_NOT_FINGERPRINTED = ("k_codec", "v_codec")


def numeric_settings(config: dict) -> dict:
    """A resolved configuration less what cannot change a run's numbers (a copy): what the results
    fingerprint hashes, and what tells two fits apart (`FittedRotations.config_hash`)."""
    conf = {k: copy.deepcopy(v) for k, v in config.items() if k not in _NOT_FINGERPRINTED}
    for section in _TASK_SECTIONS - _READS.get(conf.get("task"), set()):
        conf.pop(section, None)
    conf.get("store", {}).pop("root", None)
    # captured blocks (fits, eval) do not depend on the device; a model in the loop does (Triton on CUDA)
    if conf.get("task") not in END_TO_END:
        conf.get("model", {}).pop("device", None)
    conf.get("eval", {}).pop("batch_size", None)
    if conf.get("task") in END_TO_END:  # the model's own next tokens are scored, no top-k of attention
        conf.get("eval", {}).pop("top_k", None)
    conf["trainer"] = {k: v for k, v in conf.get("trainer", {}).items() if k not in _TRAINER_PLACEMENT}
    for key in _UNSET_NOT_FINGERPRINTED:  # a side's codec named as the codec is no other codec
        if conf.get(key) is None or conf.get(key) == (conf.get("codec") or {}).get("name"):
            conf.pop(key, None)
    for key in ("bits", "k_bits", "v_bits"):  # bits=3.0 is bits=3
        if isinstance(conf.get(key), float) and conf[key].is_integer():
            conf[key] = int(conf[key])
    compressed = [f"{side[0]}_bits" for side in ((conf.get("kv") or {}).get("compress") or ())]
    if compressed:  # one spelling of each compressed side's width: bits, and k_bits where the keys' differs
        widths = {key: conf[key] if conf.get(key) is not None else conf.get("bits") for key in compressed}
        conf["bits"] = widths.get("v_bits", widths[compressed[0]])
        for key in ("k_bits", "v_bits"):  # a side kept exact reads no bits
            if key in conf or key in widths:
                keys_differ = key == "k_bits" and key in widths and widths[key] != conf["bits"]
                conf[key] = widths[key] if keys_differ else None
    return conf


def fingerprint(cfg: DictConfig, extra: dict | None = None) -> str:
    conf = numeric_settings(resolved(cfg))
    conf["extra"] = extra or {}
    inputs = input_identities(cfg)
    if inputs:  # absent otherwise, so that runs on named models and data keep their fingerprints
        conf["inputs"] = inputs
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()


def input_identities(cfg: DictConfig) -> dict:
    """What a run reads that its configuration names only by a path or a hub id: a text file (`data=text_file`)
    and a local model folder, by content, and a hub model by the snapshot it resolves to, so that a run over
    an edited file or new weights is a new run, not the old one's results."""
    from .capture.models import OFFLINE_MODELS, model_identity
    from .capture.text import text_file_identity

    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    if data.get("source") in (None, "synthetic"):  # synthetic KV reads no file and no model
        return {}
    out = {}
    if data.get("source") == "text_file":
        out["text_file"] = text_file_identity(data["path"])
    name = model.get("name_or_path")
    if name and name not in OFFLINE_MODELS:  # an offline key names its package; a hub id its snapshot
        out["model"] = model_identity(name)
    return out


def output_dir(cfg: DictConfig) -> Path:
    """Hydra's output folder for this job, or cfg.output_dir outside Hydra (tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    raise ValueError("output_dir is not set: run through the Hydra app, or set output_dir=<folder>")


def sweep_group() -> str | None:
    """The multirun's folder name (W&B group) when this job is part of a sweep."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        return Path(HydraConfig.get().sweep.dir).name
    return None


def is_rank_zero() -> bool:
    """False in the extra processes of a multi-GPU run (Lightning's DDP launcher, torchrun, srun)."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def claim(folder: Path):
    """Hold an exclusive OS lock on `folder/lock` for the duration; refuse when another process holds it.

    The lock is `flock` on a file that is never deleted: exactly one process can hold it, the OS releases it
    when its holder exits (killed or not), so a dead owner never blocks a rerun and the file's content —
    the holder's pid and host, for the error message — may be empty or stale without harm. The extra ranks
    of a multi-GPU run work under rank 0's claim."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    if not is_rank_zero():
        yield folder
        return
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(
            f"{folder} is being written by another process ({owner}); wait for it or stop it"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        yield folder
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def link_result(out: Path, results: Path) -> None:
    """`out/result` → the results folder, as a relative link so the project can move as a whole."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "result"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(results.resolve(), out.resolve()), target_is_directory=True)


def results_of(path: str | Path) -> Path:
    """A results folder given itself or a Hydra output folder that links to it."""
    path = Path(path)
    return (path / "result").resolve() if (path / "result").exists() else path
