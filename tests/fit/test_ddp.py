"""A fit's validation under DDP: every block scored exactly once across processes, and the same val_loss as
one process."""

import json
import logging
from pathlib import Path

import lightning as L
import pytest

from tqlab.data import SyntheticKV
from tqlab.data.datamodule import KVDataModule
from tqlab.fit.module import RotationFitModule
from tqlab.rotation import BlockSO8Learned

# 7 validation sequences × 1 KV head: shards of 4 and 3 blocks, so a mean of per-process means would be off
SOURCE = dict(
    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, seq_len=16,
    sequences={"train": 2, "validation": 7, "test": 1},
)  # fmt: skip


class RecordingFit(RotationFitModule):
    """Writes the validation blocks this process scored, and the epoch's val_loss, to `out`/rank<r>.json."""

    def __init__(self, out: str):
        super().__init__({"key_layer0": BlockSO8Learned(16, seed=0)}, {"key": 2}, objective="attention")
        self.out, self.seen = out, []

    def validation_step(self, batch, batch_idx):
        self.seen += batch["sequence"].tolist()
        return super().validation_step(batch, batch_idx)

    def on_validation_end(self):
        record = {"seen": self.seen, "val_loss": float(self.trainer.callback_metrics["val_loss"])}
        (Path(self.out) / f"rank{self.global_rank}.json").write_text(json.dumps(record))


def _validate(out: Path, **trainer) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **trainer,
    )  # fmt: skip
    t.validate(
        RecordingFit(str(out)), datamodule=KVDataModule(SyntheticKV(**SOURCE), batch_size=1), verbose=False
    )


@pytest.mark.filterwarnings("ignore")
def test_ddp_validation_scores_every_block_once_with_the_one_process_loss(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _validate(one, devices=1)
    _validate(two, devices=2, strategy="ddp_spawn")
    reference = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(reference["seen"]) == list(range(7))
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(7))  # none missing, none repeated
    for rank in ranks:
        assert rank["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
