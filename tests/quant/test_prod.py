"""TurboQuantProd: unbiased inner products with the variance theory predicts."""

import math

import pytest
import torch

from tqlab.quant import TurboQuantProd, coordinate_distortion


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def paired_errors(codec, n=50_000, d=128):
    keys, queries = unit(n, d, seed=11), unit(n, d, seed=12)
    code = codec.quantize(keys.unsqueeze(1))  # n independent (query, key) pairs
    estimate = codec.score(queries.unsqueeze(1), code).reshape(-1).double()
    return estimate - (queries.double() * keys.double()).sum(-1)


@pytest.mark.parametrize("bits,expected", [(2, 0.567), (3, 0.182), (4, 0.053)])
def test_estimator_is_unbiased_with_the_paper_variance(bits, expected):
    err = paired_errors(TurboQuantProd(128, bits, seed=bits, norm_dtype=torch.float32))
    assert abs(err.mean()) < 3 * err.std() / math.sqrt(len(err))
    assert err.var().item() * 128 == pytest.approx(expected, rel=0.05)


def test_variance_scales_with_the_sketch_length():
    # Var ≈ (π/2)·D_mse(b−1)/m for unit vectors: doubling m halves it.
    err = paired_errors(TurboQuantProd(128, 3, qjl_dim=256, norm_dtype=torch.float32))
    theory = math.pi / 2 * coordinate_distortion(128, 2) / 256
    assert err.var().item() == pytest.approx(theory, rel=0.05)


def test_dequantize_is_the_paper_decoder_consistent_with_score():
    p = TurboQuantProd(64, 3)
    keys, queries = unit(40, 64, 1) * 5, unit(6, 64, 2)
    code = p.quantize(keys)
    torch.testing.assert_close(p.score(queries, code), queries @ p.dequantize(code).T, rtol=1e-4, atol=1e-4)


def test_storage_counts_indices_signs_and_two_norms():
    code = TurboQuantProd(128, 3).quantize(torch.randn(10, 128))
    assert code.indices.shape == (10, 32) and code.signs.shape == (10, 16)
    assert code.nbytes == 10 * (32 + 16 + 2 + 2)
    assert code.bits_per_coordinate == pytest.approx(3 + 32 / 128)


def test_bits_must_leave_one_for_stage_one():
    with pytest.raises(ValueError, match=r"bits=1 .* 2\.\.8"):
        TurboQuantProd(64, 1)
