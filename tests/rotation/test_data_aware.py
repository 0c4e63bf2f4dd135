"""Eigenbasis × Hadamard and SO(8) butterflies."""

import math

import pytest
import torch

from tqlab.rotation import EigenHadamard, SO8Butterfly, make_rotation
from tqlab.rotation.butterfly import butterfly_layers
from tqlab.rotation.io import load_rotations, save_rotations


def test_eigen_hadamard_gives_every_coordinate_the_mean_variance():
    d = 64
    g = torch.Generator().manual_seed(0)
    lam = torch.logspace(1, -3, d, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    x = ((torch.randn(200_000, d, generator=g, dtype=torch.float64) * lam.sqrt()) @ basis.T).float()
    rotation = EigenHadamard(d, seed=3)
    evals = rotation.fit(x)
    torch.testing.assert_close(evals, lam, rtol=0.03, atol=1e-4)
    held_out = ((torch.randn(100_000, d, generator=g, dtype=torch.float64) * lam.sqrt()) @ basis.T).float()
    variance = rotation.apply(held_out).double().pow(2).mean(0)
    assert (variance / (lam.sum() / d) - 1).abs().max() < 0.03
    # a Hadamard alone leaves them unequal on this spectrum
    plain = make_rotation("fast_hadamard", d, seed=3).apply(held_out).double().pow(2).mean(0)
    assert (plain / (lam.sum() / d) - 1).abs().max() > 0.2
    m = rotation.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    for seed in range(4):  # a rotation, never a reflection, whatever sign eigh gives the eigenvectors
        fitted = EigenHadamard(d, seed=seed)
        fitted.fit(x[seed * 1000 : (seed + 1) * 1000])
        assert torch.linalg.det(fitted.matrix().double()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dim", [8, 64, 128, 256])
def test_butterflies_are_orthogonal_dense_and_invertible(dim):
    rotation = SO8Butterfly(dim)
    torch.testing.assert_close(rotation.matrix(), torch.eye(dim))  # identity at start
    with torch.no_grad():
        rotation.generator_params.normal_(generator=torch.Generator().manual_seed(dim))
    m = rotation.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(dim, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (m.abs() > 1e-9).all()  # every output depends on every input after ⌈log₈ d⌉ layers
    x = torch.randn(5, dim)
    torch.testing.assert_close(rotation.inverse(rotation.apply(x)), x, atol=1e-5, rtol=0)
    assert rotation.generator_params.numel() == butterfly_layers(dim) * dim * 8  # O(d log d) parameters


def test_butterfly_cost_is_8_d_log8_d_multiply_adds_per_vector():
    from torch.utils.flop_counter import FlopCounterMode

    for dim in (64, 512, 4096):
        rotation, x = SO8Butterfly(dim), torch.randn(4, dim)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            rotation.apply(x)
        layers = math.ceil(math.log(dim, 8) - 1e-9)
        assert butterfly_layers(dim) == layers
        # the blocks' exponentials (L · d/8 matrix_exp of 8×8) are per call, not per vector; the rest is 8·d·L
        flops = counter.get_total_flops()
        assert (
            2 * 4 * 8 * dim * layers <= flops <= 2 * 4 * 8 * dim * layers + layers * dim / 8 * 2 * 8**3 * 20
        )
    assert flops < 2 * 4 * dim * dim / 3  # a dense d × d product would take 2 · 4 · d² at d = 4096


def test_fitted_data_aware_rotations_save_and_load_as_safetensors(tmp_path):
    rotation = make_rotation("eigen_hadamard+so8_butterfly", 16, seed=2, basis="query")
    rotation.parts[0].fit(torch.randn(500, 16) * torch.linspace(4, 0.1, 16))
    with torch.no_grad():
        rotation.parts[1].generator_params.normal_()
    facts = {"rotation": "eigen_hadamard+so8_butterfly", "rotation_options": {"basis": "query"}, "dim": 16}
    save_rotations(tmp_path / "r.safetensors", {"key_layer0_head0": rotation}, facts)
    loaded, _ = load_rotations(tmp_path / "r.safetensors")
    torch.testing.assert_close(loaded["key_layer0_head0"].matrix(), rotation.matrix())
    assert loaded["key_layer0_head0"].parts[0].basis == "query"


def test_dense_learned_rotation_starts_at_the_identity_and_stays_orthogonal():
    from tqlab.rotation import DenseLearned

    rotation = DenseLearned(12)
    torch.testing.assert_close(rotation.matrix(), torch.eye(12))
    with torch.no_grad():
        rotation.generator_params.normal_(generator=torch.Generator().manual_seed(0))
    m = rotation.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(rotation.inverse(rotation.apply(x)), x, atol=1e-5, rtol=0)
