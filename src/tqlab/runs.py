"""Where a run's results go, and the guarantees around them.

Results live in `<results_root>/<task>/<fingerprint>/`, named by a hash of the resolved configuration
(minus settings that do not change the numbers: loggers, progress bars, paths, device placement). So:
- re-running a finished configuration — e.g. a killed sweep started again — finds its results and skips;
- an unfinished one resumes in place (train: from its last saved rotations);
- two processes never write the same folder: a lock file is claimed atomically, and a second claimant of a
  live lock is refused (a lock left by a dead process is taken over).
Hydra's own output folder (logs, .hydra/) gets a `result` link to the results folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# What cannot change a run's numbers: where it runs, how it logs, how many blocks go in one step.
# `rotations` (a path) is fingerprinted by the sha256 of the file it names, passed as `extra`.
_NOT_FINGERPRINTED = {
    "hydra", "logger", "progress", "output_dir", "results_root", "resume", "rotations", "optimized_metric",
}  # fmt: skip
_TRAINER_PLACEMENT = {"accelerator", "devices", "strategy"}
_OTHER_TASK = {"train": "eval", "eval": "fit"}  # a shared debug preset may set the other app's section


class RunLocked(RuntimeError):
    pass


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def fingerprint(cfg: DictConfig, extra: dict | None = None) -> str:
    conf = {k: v for k, v in resolved(cfg).items() if k not in _NOT_FINGERPRINTED}
    conf.pop(_OTHER_TASK.get(conf.get("task")), None)
    conf.get("store", {}).pop("root", None)
    conf.get("model", {}).pop("device", None)
    conf.get("eval", {}).pop("batch_size", None)
    conf["trainer"] = {k: v for k, v in conf.get("trainer", {}).items() if k not in _TRAINER_PLACEMENT}
    conf["extra"] = extra or {}
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claim(folder: Path):
    """Hold `folder/lock` for the duration; refuse when another live process holds it. The extra ranks of
    a multi-GPU run work under rank 0's claim."""
    folder.mkdir(parents=True, exist_ok=True)
    if not is_rank_zero():
        yield folder
        return
    lock = folder / "lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            if owner.get("host") == me["host"] and owner.get("pid") and not _alive(owner["pid"]):
                log.warning("taking over %s: its previous owner (pid %s) is gone", folder, owner["pid"])
                lock.unlink(missing_ok=True)
                continue
            raise RunLocked(
                f"{folder} is being written by another process ({owner}); wait for it or stop it"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def link_result(out: Path, results: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    link = out / "result"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(results.resolve(), target_is_directory=True)


def results_of(path: str | Path) -> Path:
    """A results folder given itself or a Hydra output folder that links to it."""
    path = Path(path)
    return (path / "result").resolve() if (path / "result").exists() else path
