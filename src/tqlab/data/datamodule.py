"""A LightningDataModule over any KV source: one item per (sequence, layer, KV head) of a split."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class KVBlocks(Dataset):
    """Items in a fixed order (sequence-major, then layer, then KV head); each item is read lazily."""

    def __init__(self, source, split: str, layers: list[int] | None = None):
        self.source, self.split = source, split
        layers = source.layers if layers is None else layers
        missing = sorted(set(layers) - set(source.layers))
        if missing:
            raise ValueError(f"layers {missing} are not in this capture; it has {source.layers}")
        kv_heads = range(source.architecture["num_kv_heads"])
        self.index = [
            (s, layer, h) for s in range(source.num_sequences(split)) for layer in layers for h in kv_heads
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        sequence, layer, kv_head = self.index[i]
        item = self.source.load(self.split, layer, sequence, kv_head)
        facts = self.source.layer_facts(layer)
        item.update(sequence=sequence, layer=layer, kv_head=kv_head, scaling=facts["scaling"])
        item["sliding_window"] = facts.get("sliding_window") or 0  # 0: full causal attention
        return item


def eval_shard(n_blocks: int, rank: int, world: int) -> list[int]:
    """The blocks one process evaluates: every block exactly once across processes (a DistributedSampler
    would pad with repeats, double-counting some blocks in the means)."""
    return list(range(rank, n_blocks, world))


class EvalShard(DistributedSampler):
    """`eval_shard` as a sampler. A DistributedSampler, so that Lightning, which shards every other sampler
    under DDP, leaves it as it is (a second split would leave blocks unevaluated)."""

    def __init__(self, n_blocks: int, rank: int, world: int):
        super().__init__(range(n_blocks), num_replicas=world, rank=rank, shuffle=False)
        self.blocks = eval_shard(n_blocks, rank, world)

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


class KVDataModule(L.LightningDataModule):
    """train / val / test loaders over a capture's splits, in a deterministic order. Under DDP the train
    loader is sharded by Lightning's DistributedSampler; validation and test blocks are split across
    processes without repeats (`EvalShard`, which Lightning does not split again)."""

    def __init__(
        self,
        source,
        batch_size: int = 4,
        layers: list[int] | None = None,
        num_workers: int = 0,
        shuffle=False,
    ):
        super().__init__()
        self.source, self.batch_size, self.layers = source, batch_size, layers
        self.num_workers, self.shuffle = num_workers, shuffle

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        blocks = KVBlocks(self.source, split, self.layers)
        generator = torch.Generator().manual_seed(0) if shuffle else None
        sampler = None
        if split != "train" and torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = EvalShard(len(blocks), torch.distributed.get_rank(), torch.distributed.get_world_size())
        return DataLoader(
            blocks,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
