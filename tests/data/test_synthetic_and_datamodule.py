"""Synthetic KV and the DataModule: deterministic, disjoint splits, the outliers we planted, DDP shards."""

import pytest
import torch
from torch.utils.data import DistributedSampler

from tqlab.data import SyntheticKV
from tqlab.data.datamodule import KVBlocks, KVDataModule


def test_synthetic_kv_is_deterministic_and_splits_differ():
    a, b = SyntheticKV(seed=3), SyntheticKV(seed=3)
    torch.testing.assert_close(a.load("train", 1, 0, 0)["k"], b.load("train", 1, 0, 0)["k"])
    assert not torch.allclose(a.load("train", 1, 0, 0)["k"], a.load("test", 1, 0, 0)["k"])


def test_planted_outlier_channels_dominate_key_energy():
    kv = SyntheticKV(kind="outliers", n_outliers=4, outlier_scale=10.0, seq_len=512)
    energy = kv.load("train", 0, 0, 0)["k"].pow(2).mean(0)
    top = energy.topk(4).values.sum() / energy.sum()
    assert top > 0.5
    iso = SyntheticKV(kind="isotropic", seq_len=512).load("train", 0, 0, 0)["k"].pow(2).mean(0)
    assert iso.topk(4).values.sum() / iso.sum() < 0.15


def test_gqa_shapes_follow_the_architecture():
    kv = SyntheticKV(num_heads=6, num_kv_heads=2, head_dim=32, seq_len=16)
    item = kv.load("validation", 0, 1, kv_head=1)
    assert item["q"].shape == (3, 16, 32) and item["k"].shape == (16, 32)
    assert kv.load("validation", 0, 1)["k"].shape == (2, 16, 32)


def test_datamodule_serves_every_block_once_in_a_fixed_order():
    kv = SyntheticKV(sequences={"train": 3, "validation": 1, "test": 2})
    dm = KVDataModule(kv, batch_size=4)
    blocks = [
        (int(s), int(la), int(h))
        for b in dm.test_dataloader()
        for s, la, h in zip(b["sequence"], b["layer"], b["kv_head"], strict=True)
    ]
    assert blocks == [(s, la, h) for s in range(2) for la in range(2) for h in range(2)]
    first = next(iter(dm.train_dataloader()))
    assert first["q"].shape == (4, 2, 128, 64)


def test_ddp_sampler_shards_blocks_without_overlap():
    ds = KVBlocks(SyntheticKV(), "train")
    shards = [set(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(len(ds)))


def test_unknown_layers_and_kind_are_refused():
    with pytest.raises(ValueError, match=r"layers \[5\] are not in this capture"):
        KVBlocks(SyntheticKV(), "train", layers=[0, 5])
    with pytest.raises(ValueError, match="data.kind='gaussian'"):
        SyntheticKV(kind="gaussian")


@pytest.mark.parametrize("n_blocks", [1, 7, 24, 25])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_evaluation_shards_cover_every_block_exactly_once(n_blocks, world):
    from tqlab.data.datamodule import eval_shard

    shards = [eval_shard(n_blocks, rank, world) for rank in range(world)]
    seen = [i for shard in shards for i in shard]
    assert sorted(seen) == list(range(n_blocks))  # no block missing, none repeated
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
