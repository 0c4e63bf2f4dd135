"""RotationFitModule: fits learned rotations per layer (optionally per KV head) with the codec in the loop."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from ..quant import TurboQuantMSE
from ..rotation.io import save_rotations, unit_name
from .objectives import key_loss, value_loss
from .state import load_optimizer, optimizer_tensors, save_state


class RotationFitModule(L.LightningModule):
    def __init__(
        self,
        rotations: dict[str, nn.Module],
        fit_bits: dict[str, int],
        objective: str = "attention",
        per_head: bool = False,
        lr: float = 0.01,
        temperature: float = 0.1,
        means: dict[str, torch.Tensor] | None = None,
    ):
        """rotations: the rotation to fit per unit (`unit_name(layer, head or None, side)`), as built by
        `tqlab.kv.builder.fit_rotations`; fit_bits: Stage-1 bits per side (b for MSE codecs, b − 1 for Prod);
        means: per unit, the train mean its codec codes around (`codec.center`), as `fit_means` gives."""
        super().__init__()
        self.objective, self.lr, self.per_head, self.fit_bits = objective, lr, per_head, fit_bits
        # codec.center: each unit codes x − its train mean (fixed; recomputed from the data on resume)
        self.temperature, self.means = temperature, dict(means or {})
        self.codecs = nn.ModuleDict(
            {
                unit: TurboQuantMSE(rot.dim, fit_bits[unit.split("_")[0]], rotation=rot)
                for unit, rot in rotations.items()
            }
        )
        self.val_mean = BlockMean()

    def rotations(self) -> dict[str, nn.Module]:
        return {unit: codec.rotation for unit, codec in self.codecs.items()}

    def block_loss(self, item: dict, temperature: float = 0.0) -> torch.Tensor:
        """The block's loss; temperature > 0: through the soft quantizer (training), 0: the hard one."""
        q, k, v, layer, head, scaling = (
            item["q"],
            item["k"],
            item["v"],
            item["layer"],
            item["kv_head"],
            item["scaling"],
        )
        losses = []
        for target in sorted(self.fit_bits):
            unit = unit_name(layer, head if self.per_head else None, target)
            codec, mean, window = self.codecs[unit], self.means.get(unit), item.get("sliding_window", 0)
            if target == "key":
                losses.append(key_loss(self.objective, codec, q, k, scaling, window, temperature, mean))
            else:
                losses.append(value_loss(self.objective, codec, q, k, v, scaling, window, temperature, mean))
        return torch.stack(losses).sum()

    def _batch_loss(self, batch: dict, temperature: float = 0.0) -> torch.Tensor:
        items = [
            {
                "q": batch["q"][b].float(),
                "k": batch["k"][b].float(),
                "v": batch["v"][b].float(),
                "layer": int(batch["layer"][b]),
                "kv_head": int(batch["kv_head"][b]),
                "scaling": float(batch["scaling"][b]),
                "sliding_window": int(batch["sliding_window"][b]),
            }
            for b in range(batch["q"].shape[0])
        ]
        return torch.stack([self.block_loss(item, temperature) for item in items]).mean()

    def training_step(self, batch, batch_idx):
        loss = self._batch_loss(batch, self.temperature)
        self.log(
            "train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["q"].shape[0]
        )
        return loss

    def validation_step(self, batch, batch_idx):
        blocks = batch["q"].shape[0]
        self.val_mean.update(self._batch_loss(batch).detach() * blocks, blocks)
        self.log("val_loss", self.val_mean, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class BlockMean(Metric):
    """The mean loss over every validation block, whichever process scored it: sums and counts reduced across
    processes (a mean of per-process means would weight unequal shards wrongly). NaN propagates."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, blocks: int) -> None:
        # out of place: the states may be inference tensors from a `trainer.validate` before the fit
        self.total = self.total + loss_sum.double()
        self.count = self.count + blocks

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class SaveRotations(L.Callback):
    """After each epoch's validation: `last.safetensors`; `best.safetensors` when val_loss improves; then the
    rest of the training state (`state.save_state`: module and optimizer tensors, epoch, best val_loss, early
    stopping) so that a killed run, re-run, ends bitwise as an uninterrupted one would. It must come after the
    EarlyStopping callback, checking on validation end, so that the state includes this epoch's check.

    state: the fit_state.json to continue from (`state.load_state`) with its tensors, or for a new fit
    `{"val_loss_initial": …}` and no tensors."""

    def __init__(self, folder: Path, facts: dict, state: dict, tensors: dict | None = None):
        self.folder, self.facts, self.state, self.tensors = Path(folder), facts, dict(state), tensors
        self.best = state.get("best_val_loss", float("inf"))

    def on_fit_start(self, trainer, module: RotationFitModule) -> None:
        if self.tensors is None:
            return
        module.load_state_dict(_unprefixed(self.tensors, "module."))
        load_optimizer(trainer.optimizers[0], module, _unprefixed(self.tensors, "optimizer."))
        stopping = self.state["early_stopping"]
        trainer.early_stopping_callback.load_state_dict(
            {**stopping, "best_score": torch.tensor(stopping["best_score"])}
        )
        # Lightning counts epochs from 0 in a new Trainer: start at the true epoch, so that progress bars, logged
        # epochs, max_epochs and the samplers' set_epoch (the shuffle order) carry on where the run stopped
        epoch_progress = trainer.fit_loop.epoch_progress
        for counts in (epoch_progress.total, epoch_progress.current):
            counts.ready = counts.started = counts.processed = counts.completed = self.state["epochs_done"]
        if trainer.is_global_zero:
            # last.safetensors may be ahead of the state (killed between the writes) or cut short: rewrite it
            epoch, val = self.state["epochs_done"], self.state["last_val_loss"]
            save_rotations(self.folder / "last.safetensors", module.rotations(), self._facts(epoch, val))

    def on_validation_end(self, trainer, module: RotationFitModule) -> None:
        # trainer.validate's initial val_loss is no epoch: saving it would count an epoch never trained
        if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.is_global_zero:
            return
        val = float(trainer.callback_metrics["val_loss"])
        epoch = trainer.current_epoch + 1
        facts = self._facts(epoch, val)
        save_rotations(self.folder / "last.safetensors", module.rotations(), facts)
        if val < self.best:
            self.best = val
            save_rotations(self.folder / "best.safetensors", module.rotations(), facts)
        stopping = trainer.early_stopping_callback.state_dict()
        self.state.update(
            epochs_done=epoch,
            best_val_loss=self.best,
            last_val_loss=val,
            stopped=trainer.should_stop,
            early_stopping={**stopping, "best_score": float(stopping["best_score"])},
        )
        tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
        tensors |= {f"optimizer.{k}": v for k, v in optimizer_tensors(trainer.optimizers[0], module).items()}
        save_state(self.folder, self.state, tensors)

    def _facts(self, epoch: int, val_loss: float) -> dict:
        return {**self.facts, "epoch": epoch, "val_loss": val_loss}


def _unprefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
