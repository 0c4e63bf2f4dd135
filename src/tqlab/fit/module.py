"""RotationFitModule: fits learned rotations per layer (optionally per KV head) with the codec in the loop."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch import nn

from ..quant import TurboQuantMSE
from ..rotation.io import save_rotations, unit_name
from .objectives import key_loss, value_loss


class RotationFitModule(L.LightningModule):
    def __init__(
        self,
        rotations: dict[str, nn.Module],
        fit_bits: dict[str, int],
        objective: str = "attention",
        per_head: bool = False,
        lr: float = 0.01,
    ):
        """rotations: the rotation to fit per unit (`unit_name(layer, head or None, side)`), as built by
        `tqlab.kv.builder.fit_rotations`; fit_bits: Stage-1 bits per side (b for MSE codecs, b − 1 for Prod)."""
        super().__init__()
        self.objective, self.lr, self.per_head, self.fit_bits = objective, lr, per_head, fit_bits
        self.codecs = nn.ModuleDict(
            {
                unit: TurboQuantMSE(rot.dim, fit_bits[unit.split("_")[0]], rotation=rot)
                for unit, rot in rotations.items()
            }
        )

    def rotations(self) -> dict[str, nn.Module]:
        return {unit: codec.rotation for unit, codec in self.codecs.items()}

    def block_loss(self, item: dict) -> torch.Tensor:
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
            codec = self.codecs[unit_name(layer, head if self.per_head else None, target)]
            if target == "key":
                losses.append(key_loss(self.objective, codec, q, k, scaling, item.get("sliding_window", 0)))
            else:
                losses.append(
                    value_loss(self.objective, codec, q, k, v, scaling, item.get("sliding_window", 0))
                )
        return torch.stack(losses).sum()

    def _batch_loss(self, batch: dict) -> torch.Tensor:
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
        return torch.stack([self.block_loss(item) for item in items]).mean()

    def training_step(self, batch, batch_idx):
        loss = self._batch_loss(batch)
        self.log(
            "train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["q"].shape[0]
        )
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._batch_loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=batch["q"].shape[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SaveRotations(L.Callback):
    """After each validation: `last.safetensors` always, `best.safetensors` when val_loss improves, and
    `fit_state.json` (epochs done, best val_loss) so a run directory can be resumed."""

    def __init__(self, folder: Path, facts: dict, best: float = float("inf"), epochs_before: int = 0):
        self.folder, self.facts = Path(folder), facts
        self.best, self.epochs_before = best, epochs_before

    def on_validation_end(self, trainer, module: RotationFitModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        val = float(trainer.callback_metrics["val_loss"])
        epoch = self.epochs_before + trainer.current_epoch + 1
        facts = {**self.facts, "epoch": epoch, "val_loss": val}
        save_rotations(self.folder / "last.safetensors", module.rotations(), facts)
        if val < self.best:
            self.best = val
            save_rotations(self.folder / "best.safetensors", module.rotations(), facts)
        state = {"epochs_done": epoch, "best_val_loss": self.best, "last_val_loss": val}
        (self.folder / "fit_state.json").write_text(json.dumps(state, indent=2))
