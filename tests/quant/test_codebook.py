"""Lloyd-Max codebooks against theory: the paper's distortion table and an independent quadrature."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from tqlab.quant import TurboQuantMSE, coordinate_distortion, lloyd_max_codebook

# E‖u − û‖² at d = 128 from numerical Lloyd-Max solves (docs/theory.md, "computed")
D128 = {1: 0.36089, 2: 0.11600, 3: 0.03397, 4: 0.00931}
# Gaussian-limit centroids × √d (same source)
GAUSS = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3439, 2.1519]}


def unit_vectors(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_distortion_matches_the_reference_table(bits):
    assert coordinate_distortion(128, bits) == pytest.approx(D128[bits], abs=5e-6)  # table has 5 decimals


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_centroids_approach_the_gaussian_limit(bits):
    centroids, _ = lloyd_max_codebook(16384, bits)
    upper = centroids[len(centroids) // 2 :] * math.sqrt(16384)
    np.testing.assert_allclose(upper, GAUSS[bits], atol=2e-3)


@pytest.mark.parametrize("dim,bits", [(16, 3), (64, 2), (128, 5)])
def test_centroids_are_cell_means_by_quadrature(dim, bits):
    # Lloyd-Max optimality, checked by direct numerical integration of f_d (not the closed forms).
    c, b = lloyd_max_codebook(dim, bits)
    log_c = special.gammaln(dim / 2) - special.gammaln((dim - 1) / 2) - 0.5 * math.log(math.pi)
    f = lambda t: math.exp(log_c) * (1 - t * t) ** ((dim - 3) / 2)  # noqa: E731
    edges = [-1.0, *b, 1.0]
    for k in range(len(c)):
        mass = integrate.quad(f, edges[k], edges[k + 1], epsabs=1e-14)[0]
        mean = integrate.quad(lambda t: t * f(t), edges[k], edges[k + 1], epsabs=1e-14)[0] / mass
        assert mean == pytest.approx(c[k], abs=1e-7)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-15)


def test_measured_distortion_at_d128_matches_theory_and_falls_with_every_bit():
    u = unit_vectors(50_000, 128, seed=1)
    measured = {}
    for bits in range(1, 9):
        q = TurboQuantMSE(128, bits, seed=bits, norm_dtype=torch.float32)
        measured[bits] = ((q.dequantize(q.quantize(u)) - u) ** 2).sum(-1).mean().item()
    for bits, expected in D128.items():
        assert measured[bits] == pytest.approx(expected, rel=0.015)
    assert all(measured[b + 1] < measured[b] for b in range(1, 8))
    assert measured[8] < 6e-5


def test_high_bit_codebooks_are_converged():
    # Panter-Dite high-rate limit: D ≈ (√3·π/2)·4^−b ≈ 2.72·4^−b for a Gaussian source.
    assert coordinate_distortion(128, 8) == pytest.approx(math.sqrt(3) * math.pi / 2 * 4**-8, rel=0.05)


def test_bad_bits_and_dim_are_refused_with_the_allowed_range():
    with pytest.raises(ValueError, match=r"bits=9 is not allowed .* 1\.\.8"):
        lloyd_max_codebook(128, 9)
    with pytest.raises(ValueError, match="dim=4"):
        lloyd_max_codebook(4, 2)
