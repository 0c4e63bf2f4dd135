"""What a fit saves so that a killed run, re-run, ends exactly as an uninterrupted one: the module's and the
optimizer's tensors (safetensors) and the rest as JSON — never pickles.

`fit_state.json` is the commit point. It is written last, atomically, and names the tensor file of its own
epoch (`fit_state.<epoch>.safetensors`, a new file each epoch), so a run killed between any two writes leaves
the previous epoch's state whole."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from ..data.datamodule import KVDataModule
from ..registry import RuleError

STATE = "fit_state.json"
KEYS = (
    "epochs_done",
    "best_val_loss",
    "last_val_loss",
    "val_loss_initial",
    "stopped",
    "early_stopping",
    "tensors",
)


class StateUnreadable(RuleError):
    """A saved fit state that cannot be read (a RuleError, so the apps print it as one line)."""


class EpochShuffle(RandomSampler):
    """Reshuffles from (seed, epoch) alone: Lightning calls `set_epoch` before each epoch, so the order does not
    depend on how many epochs this process has run and a resumed fit sees the uninterrupted fit's order. (Under
    DDP Lightning swaps a RandomSampler for a DistributedSampler, which seeds itself the same way.)"""

    def __init__(self, data, seed: int):
        super().__init__(data, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)  # as DistributedSampler seeds


class EpochShuffled(KVDataModule):
    """A KVDataModule whose train blocks come in EpochShuffle's order."""

    def __init__(self, source, seed: int, **kwargs):
        super().__init__(source, **kwargs)
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        blocks = super().train_dataloader().dataset
        return DataLoader(
            blocks,
            batch_size=self.batch_size,
            sampler=EpochShuffle(blocks, self.seed),
            num_workers=self.num_workers,
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a new temp file in the same folder, flush it to disk, then rename it over `path`:
    readers, and a rerun after a kill, find the old content or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created exclusively
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def optimizer_tensors(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every per-parameter state tensor (Adam: step, exp_avg, exp_avg_sq) as `<parameter>.<key>`."""
    names = {p: n for n, p in module.named_parameters()}
    return {f"{names[p]}.{k}": v for p, s in optimizer.state.items() for k, v in s.items()}


def load_optimizer(optimizer: torch.optim.Optimizer, module: torch.nn.Module, tensors: dict) -> None:
    """Restore what `optimizer_tensors` saved."""
    names = {p: n for n, p in module.named_parameters()}
    # state_dict numbers the parameters in this order; load_state_dict also moves the tensors to their devices
    index = {names[p]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, k = key.rpartition(".")
        state.setdefault(index[name], {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_state(folder: Path, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors, then `fit_state.json` naming them, then drop the tensor files of earlier epochs."""
    from safetensors.torch import save

    name = f"fit_state.{state['epochs_done']:04d}.safetensors"
    write_atomic(folder / name, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    write_atomic(folder / STATE, json.dumps({**state, "tensors": name}, indent=2).encode())
    for old in folder.glob("fit_state.*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(fit_state.json, its tensors), or None when no epoch was saved; StateUnreadable says what to do when
    they, or best.safetensors, cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        missing = set(KEYS) - set(state)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
        path = folder / state["tensors"]
        tensors = load_file(path)
        path = folder / "best.safetensors"  # unlike last.safetensors, it cannot be rewritten from the state
        if path.exists():  # absent only when no epoch's val_loss was finite
            load_file(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise StateUnreadable(
            f"cannot resume {folder}: {path.name} is unreadable ({type(err).__name__}: {err}); it was cut short "
            "(a crash or a full disk) or written by an older tqlab, so this fit cannot continue exactly. To fit "
            f"again from scratch: rm -r {folder}, then run the train.py command that started it again"
        ) from err
    return state, tensors
