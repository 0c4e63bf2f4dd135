"""A fit's saved state: shuffle order from (seed, epoch) alone, Adam restored bitwise, fit_state.json as the
commit point."""

import json

import pytest
import torch
from safetensors.torch import load, save

from tqlab.fit import state as fit_state
from tqlab.fit.state import EpochShuffle, load_optimizer, load_state, optimizer_tensors, save_state


def test_the_shuffle_order_depends_only_on_seed_and_epoch():
    run = EpochShuffle(range(50), seed=3)
    orders = []
    for epoch in range(3):
        run.set_epoch(epoch)
        orders.append(list(run))
    resumed = EpochShuffle(range(50), seed=3)  # a new process, starting at epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
    assert orders[0] != orders[1] != orders[2] and sorted(orders[0]) == list(range(50))


def adam_steps(model, optimizer, steps):
    for step in range(steps):
        optimizer.zero_grad()
        model(torch.full((2, 4), float(step + 1))).pow(2).sum().backward()
        optimizer.step()


def test_adam_restored_from_safetensors_continues_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    adam_steps(model, optimizer, 3)
    saved = load(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    moments = load(save(optimizer_tensors(optimizer, model)))
    assert sorted(moments) == [
        f"{p}.{k}" for p in ("bias", "weight") for k in ("exp_avg", "exp_avg_sq", "step")
    ]

    twin.load_state_dict(saved)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.1)
    load_optimizer(twin_optimizer, twin, moments)
    adam_steps(model, optimizer, 2)
    adam_steps(twin, twin_optimizer, 2)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()


def state(epoch):
    keys = dict.fromkeys(fit_state.KEYS)
    return {**keys, "epochs_done": epoch, "early_stopping": {"wait_count": 0}}


def test_a_crash_before_fit_state_json_leaves_the_previous_epoch_whole(tmp_path, monkeypatch):
    save_state(tmp_path, state(1), {"w": torch.ones(2)})
    replace = fit_state.os.replace

    def die_on_the_json(src, dst):  # the run is killed right before fit_state.json is replaced
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(fit_state.os, "replace", die_on_the_json)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path, state(2), {"w": torch.full((2,), 2.0)})
    monkeypatch.undo()
    saved, tensors = load_state(tmp_path)
    assert saved["epochs_done"] == 1 and tensors["w"].tolist() == [1.0, 1.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind

    save_state(tmp_path, state(2), {"w": torch.full((2,), 2.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit_state.0002.safetensors", "fit_state.json"]
    assert json.loads((tmp_path / "fit_state.json").read_text())["tensors"] == "fit_state.0002.safetensors"
