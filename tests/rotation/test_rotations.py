"""Rotations: orthogonality, det +1, fast paths equal to dense matrices, clear errors."""

import math

import pytest
import torch
from scipy.linalg import hadamard

from tqlab.rotation import ROTATIONS, BlockSO8Learned, FastHadamard, make_rotation

NAMES = [*ROTATIONS, "fast_hadamard+block_so8_learned", "random_haar+block_so8_static"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [64, 128])
def test_rotation_is_orthogonal_with_det_plus_one_and_inverts(name, dim):
    r = make_rotation(name, dim, seed=5)
    m = r.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(dim, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.det(m).item() == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(3, 7, dim)
    torch.testing.assert_close(r.apply(x), x @ m.float().T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.inverse(r.apply(x)), x, atol=1e-5, rtol=1e-5)


def test_fast_hadamard_equals_the_dense_sylvester_matrix_with_its_signs():
    r = FastHadamard(64, seed=2)
    dense = torch.diag(r.signs_out) @ torch.from_numpy(hadamard(64)).float() @ torch.diag(r.signs_in) / 8
    torch.testing.assert_close(r.matrix(), dense, atol=1e-6, rtol=0)


def test_haar_rotation_spreads_a_basis_vector_with_variance_one_over_d():
    # Π e_1 over many seeds: coordinates have mean 0 and variance 1/d (the sphere's marginal)
    cols = torch.stack([make_rotation("random_haar", 32, seed=s).matrix()[:, 0] for s in range(400)])
    assert cols.mean().abs() < 0.01
    assert cols.pow(2).mean().item() == pytest.approx(1 / 32, rel=0.02)


def test_seeds_give_reproducible_and_different_rotations():
    a, b, c = (make_rotation("block_so8_static", 64, seed=s).matrix() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_learned_blocks_are_differentiable_and_stay_orthogonal_after_a_step():
    r = BlockSO8Learned(64, seed=0)
    x = torch.randn(32, 64)
    loss = (r.apply(x)[:, :8] ** 2).sum()
    loss.backward()
    assert r.generator_params.grad.abs().sum() > 0
    with torch.no_grad():
        r.generator_params -= 0.1 * r.generator_params.grad
    m = r.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)


def test_identity_init_starts_at_the_identity():
    assert torch.equal(BlockSO8Learned(16, init="identity").matrix(), torch.eye(16))


def test_module_apply_with_a_function_still_works():
    seen = []
    make_rotation("fast_hadamard+block_so8_learned", 16).apply(lambda m: seen.append(type(m).__name__))
    assert "BlockSO8Learned" in seen and "FastHadamard" in seen


def test_bad_names_dims_and_options_are_refused_clearly():
    with pytest.raises(ValueError, match=r"'haar' is not a rotation; choose from"):
        make_rotation("haar", 64)
    with pytest.raises(ValueError, match="divisible by 8"):
        make_rotation("block_so8_learned", 20)
    with pytest.raises(ValueError, match="power of two"):
        make_rotation("fast_hadamard", 48)
    with pytest.raises(ValueError, match="view="):
        make_rotation("block_so8_learned", 16, view="spinor")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['view'\]"):
        make_rotation("random_haar", 16, view="vector")
    with pytest.raises(ValueError, match="expects vectors of dim 16"):
        make_rotation("identity", 16).apply(torch.zeros(2, 8))


def test_rotations_move_with_the_module():
    r = make_rotation("fast_hadamard+block_so8_learned", 16).to(torch.float64)
    assert r.parts[0].signs_in.dtype == torch.float64
    assert math.isclose(r.apply(torch.ones(1, 16, dtype=torch.float64)).norm().item(), 4.0, rel_tol=1e-9)


def test_the_dense_form_used_on_gpus_is_the_fast_transform():
    from tqlab.rotation import FastHadamard

    rotation = FastHadamard(64, seed=3)
    torch.testing.assert_close(rotation.dense(), rotation.matrix(), atol=1e-6, rtol=0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(x @ rotation._dense_on(x).T, rotation.apply(x), atol=1e-5, rtol=0)
    other = FastHadamard(64, seed=4)
    rotation.load_state_dict(other.state_dict())  # new signs: the cached dense form is rebuilt
    torch.testing.assert_close(x @ rotation._dense_on(x).T, other.apply(x), atol=1e-5, rtol=0)
