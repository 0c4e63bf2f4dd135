"""Rotation fitting: gradients exist where a straight-through estimator has none, and fitting helps."""

import torch

from tqlab.data import SyntheticKV
from tqlab.fit.module import RotationFitModule
from tqlab.fit.objectives import key_loss, reconstruct
from tqlab.quant import TurboQuantMSE
from tqlab.rotation import BlockSO8Learned


def test_reconstruction_error_has_a_gradient_through_the_rotation():
    codec = TurboQuantMSE(16, 2, rotation=BlockSO8Learned(16, seed=0))
    k = torch.randn(50, 16)
    loss = key_loss("mse", codec, torch.randn(1, 50, 16), k, 0.25)
    loss.backward()
    assert codec.rotation.generator_params.grad.abs().sum() > 0
    # and the forward value is the real codec's error (codes held fixed changes only the backward pass)
    real = ((codec.dequantize(codec.quantize(k)) - k).pow(2).sum() / k.pow(2).sum()).item()
    assert abs(loss.item() - real) < 1e-3 * real


def fit(module, source, steps=60):
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for step in range(steps):
        item = source.load("train", 0, step % source.num_sequences("train"), 0)
        loss = module.block_loss({**item, "layer": 0, "kv_head": 0, "scaling": 0.125})
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_learned_blocks_beat_the_identity_on_anisotropic_keys_held_out():
    source = SyntheticKV(
        kind="outliers", num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, seq_len=256, n_outliers=3
    )
    rotation = BlockSO8Learned(32, init="identity")
    module = RotationFitModule({"key_layer0": rotation}, {"key": 2}, objective="mse")
    identity = TurboQuantMSE(32, 2, rotation="identity")
    fit(module, source)
    learned = module.codecs["key_layer0"]
    test = torch.cat([source.load("test", 0, s, 0)["k"] for s in range(4)])

    def rel_err(codec):
        return ((codec.dequantize(codec.quantize(test)) - test).pow(2).sum() / test.pow(2).sum()).item()

    assert rel_err(learned) < 0.8 * rel_err(identity)
    m = learned.rotation.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)


def test_reconstruct_keeps_norms_and_codes_of_the_codec():
    codec = TurboQuantMSE(16, 3, rotation=BlockSO8Learned(16, seed=1))
    x = torch.randn(20, 16)
    torch.testing.assert_close(
        reconstruct(codec, x), codec.dequantize(codec.quantize(x)), atol=2e-3, rtol=2e-3
    )
