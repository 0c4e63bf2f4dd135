"""Triality views: the Clifford algebra, the homomorphism, and genuinely different spectra."""

import itertools

import pytest
import torch

from tqlab.rotation import BlockSO8Learned
from tqlab.rotation.triality import VIEWS, gamma_matrices, octonion_left_multiplications, represent

I8, I16 = torch.eye(8, dtype=torch.float64), torch.eye(16, dtype=torch.float64)


def skew(seed):
    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a - a.T


def test_octonion_units_are_orthogonal_antisymmetric_and_anticommute():
    e = octonion_left_multiplications()
    for i in range(7):
        torch.testing.assert_close(e[i] @ e[i].T, I8)
        torch.testing.assert_close(e[i] + e[i].T, torch.zeros_like(I8))
        for j in range(i):
            torch.testing.assert_close(e[i] @ e[j] + e[j] @ e[i], torch.zeros_like(I8))


def test_gamma_matrices_generate_the_clifford_algebra():
    g = gamma_matrices()
    for i, j in itertools.product(range(8), repeat=2):
        torch.testing.assert_close(g[i] @ g[j] + g[j] @ g[i], 2 * I16 * (i == j))
    torch.testing.assert_close(g, g.transpose(-1, -2))


@pytest.mark.parametrize("view", VIEWS)
def test_each_view_is_a_lie_algebra_homomorphism_into_so8(view):
    a, b = skew(1), skew(2)
    ra, rb = represent(a, view), represent(b, view)
    torch.testing.assert_close(represent(a @ b - b @ a, view), ra @ rb - rb @ ra, atol=1e-12, rtol=0)
    torch.testing.assert_close(ra, -ra.T)


def angles(rotation):
    return torch.linalg.eigvals(rotation).angle()


def test_half_spin_angles_are_the_signed_half_sums_of_the_vector_angles():
    a = skew(3) * 0.3  # small enough that no angle wraps around ±π
    theta = angles(torch.matrix_exp(a)).sort().values[4:]  # θ1..θ4 (the positive half)
    signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=4)), dtype=torch.float64)
    combos = signs @ theta / 2
    both = torch.cat([angles(torch.matrix_exp(represent(a, v))) for v in ("spinor_plus", "spinor_minus")])
    torch.testing.assert_close(both.sort().values, combos.sort().values, atol=1e-10, rtol=0)


def test_the_three_views_of_a_generic_element_have_different_spectra():
    a = skew(4)
    spectra = [angles(torch.matrix_exp(represent(a, v))).abs().sort().values for v in VIEWS]
    for s, t in itertools.combinations(spectra, 2):
        assert (s - t).abs().max() > 1e-3


def test_views_of_a_learned_rotation_are_different_orthogonal_maps():
    mats = [BlockSO8Learned(16, seed=7, view=v).matrix() for v in VIEWS]
    for m in mats:
        torch.testing.assert_close(m @ m.T, torch.eye(16), atol=1e-5, rtol=0)
    for m, n in itertools.combinations(mats, 2):
        assert (m - n).abs().max() > 0.1


def _generator_coordinates(view: str) -> torch.Tensor:
    """The 28 × 28 matrix of a view's map so(8) → so(8) on the coordinates A_ij, i < j."""
    upper = torch.triu_indices(8, 8, 1)
    basis = torch.zeros(28, 8, 8, dtype=torch.float64)
    basis[range(28), upper[0], upper[1]] = 1
    basis = basis - basis.transpose(-1, -2)
    return represent(basis, view)[:, upper[0], upper[1]].T


@pytest.mark.parametrize("view", ["spinor_plus", "spinor_minus"])
def test_as_parametrisations_the_views_differ_only_by_an_orthogonal_change_of_generator_coordinates(view):
    # so every view reaches the same rotations, and plain gradient descent follows the same path in each
    m = _generator_coordinates(view)
    torch.testing.assert_close(m.T @ m, torch.eye(28, dtype=torch.float64), atol=1e-12, rtol=0)


def test_spinor_minus_is_spinor_plus_with_the_last_axis_reflected():
    # ρ₋(A) = ρ₊(PAP), P = diag(1, …, 1, −1): seven generator entries change sign, so even Adam, which is
    # invariant to coordinate sign flips but not to rotations, fits the two half-spin views identically
    reflect = torch.diag(torch.tensor([1.0] * 7 + [-1.0], dtype=torch.float64))
    a = torch.randn(5, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a - a.transpose(-1, -2)
    torch.testing.assert_close(
        represent(a, "spinor_minus"), represent(reflect @ a @ reflect, "spinor_plus"), atol=1e-12, rtol=0
    )
    flips = torch.linalg.solve(_generator_coordinates("spinor_plus"), _generator_coordinates("spinor_minus"))
    assert torch.allclose(flips, torch.diag(flips.diagonal())) and int((flips.diagonal() < 0).sum()) == 7
