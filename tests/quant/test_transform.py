"""Transform coding: Gaussian Lloyd-Max against Max's table, the greedy allocation against brute force, the
coder against its analytic distortion on a Gaussian of known spectrum, and honest bytes."""

import itertools
import math

import numpy as np
import pytest
import torch

from tqlab.quant import TransformCoder, TurboQuantMSE, make_codec
from tqlab.quant.gaussian import (
    allocate_bits,
    allocated_distortion,
    gaussian_distortion,
    gaussian_lloyd_max,
    water_filling_bound,
)
from tqlab.quant.packing import pack_fields, unpack_fields


def test_gaussian_lloyd_max_matches_the_known_distortions():
    # Max (1960) / Jayant & Noll: optimal quantizers of N(0, 1) with 2, 4, 8, 16 levels
    for bits, known in zip((1, 2, 3, 4), (0.3634, 0.1175, 0.03455, 0.009501), strict=True):
        assert gaussian_distortion(bits) == pytest.approx(known, rel=2e-4)
    centroids, boundaries, _ = gaussian_lloyd_max(1)
    assert centroids[1] == pytest.approx(math.sqrt(2 / math.pi))  # E|X|
    assert boundaries[0] == 0
    # high-rate theory: D(b) → (√3 π / 2) · 4^-b
    assert gaussian_distortion(8) * 4**8 == pytest.approx(math.sqrt(3) * math.pi / 2, rel=0.03)


def test_greedy_allocation_is_the_best_integer_allocation():
    lam = np.array([5.0, 2.0, 1.0, 0.3, 0.05])
    for budget in (3, 6, 9):
        best = min(
            allocated_distortion(lam, b) for b in itertools.product(range(5), repeat=5) if sum(b) == budget
        )
        bits = allocate_bits(lam, budget, max_bits=4)
        assert bits.sum() == budget
        assert allocated_distortion(lam, bits) == pytest.approx(best)


def test_water_filling_bound_is_the_closed_form_at_high_rate():
    lam = np.array([4.0, 1.0, 0.25])
    total = 12.0  # every component is above the water level: D = d · 2^{-2R/d} · (Π λ)^{1/d}
    closed = 3 * 2 ** (-2 * total / 3) * np.prod(lam) ** (1 / 3)
    assert water_filling_bound(lam, total) == pytest.approx(closed, rel=1e-6)
    assert water_filling_bound(lam, 0) == pytest.approx(lam.sum())
    # hundreds of bits per vector (4 bits at d = 128 and more): the bisection's bracket must not underflow
    lam = np.linspace(0.1, 3, 128)
    for total in (600, 1024):
        closed = 128 * 2 ** (np.log2(lam).mean() - 2 * total / 128)
        assert water_filling_bound(lam, total) == pytest.approx(closed, rel=1e-6)


def test_variable_width_fields_round_trip_without_padding_between_them():
    widths = torch.tensor([3, 0, 1, 7, 2, 0, 5])
    values = torch.stack(
        [torch.randint(0, 2**w, (40,)) if w else torch.zeros(40, dtype=torch.long) for w in widths], -1
    )
    packed = pack_fields(values, widths)
    assert packed.shape == (40, math.ceil(18 / 8)) and packed.dtype == torch.uint8
    torch.testing.assert_close(unpack_fields(packed, widths), values)
    with pytest.raises(ValueError, match="need uint8 rows of 3 bytes"):
        unpack_fields(packed[:, :2], widths)


def gaussian(n, lam, basis, seed):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, len(lam), generator=g, dtype=torch.float64) * lam.sqrt()) @ basis.T).float()


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_coder_reaches_its_analytic_distortion_on_a_known_gaussian(bits):
    d = 32
    lam = torch.exp(-torch.arange(d, dtype=torch.float64) / 6)
    basis, _ = torch.linalg.qr(
        torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    coder = TransformCoder(d, bits, scale="none")
    widths = coder.calibrate(gaussian(100_000, lam, basis, 1))
    x = gaussian(20_000, lam, basis, 2)  # held out
    mse = (coder.dequantize(coder.quantize(x)) - x).double().pow(2).sum(-1).mean().item()
    analytic = allocated_distortion(lam.numpy(), widths.numpy())
    assert mse == pytest.approx(analytic, rel=0.03)
    assert widths.sum() == bits * d and widths[0] >= widths[-1]
    # above the Shannon bound, and far below equal bits after a Hadamard rotation on this spectrum
    assert water_filling_bound(lam.numpy(), bits * d) < mse
    hadamard = TurboQuantMSE(d, bits, rotation="fast_hadamard")
    assert mse < 0.6 * (hadamard.dequantize(hadamard.quantize(x)) - x).pow(2).sum(-1).mean().item()


def test_bytes_are_the_stored_tensors_and_scores_equal_decoded_inner_products():
    d = 16
    coder = make_codec("transform_coding", d, 2.5)  # 40 bits per vector + an fp16 norm
    coder.calibrate(torch.randn(2000, d) * torch.linspace(3, 0.1, d))
    x, q = torch.randn(7, 5, d) * 10, torch.randn(7, 3, d)
    code = coder.quantize(x)
    assert (
        code.nbytes == 7 * 5 * (5 + 2) == sum(t.numel() * t.element_size() for t in code.tensors().values())
    )
    assert code.bits_per_coordinate == pytest.approx(8 * 7 / d)
    torch.testing.assert_close(
        coder.score(q, code), q @ coder.dequantize(code).transpose(-1, -2), atol=1e-4, rtol=1e-4
    )
    # the norm is stored: a vector 1000× larger decodes 1000× larger with the same relative error
    big = coder.dequantize(coder.quantize(x[:1] * 1000)) / 1000
    torch.testing.assert_close(big, coder.dequantize(coder.quantize(x[:1])), atol=1e-2, rtol=1e-2)


def test_rows_whose_float32_squares_overflow_or_underflow_keep_their_norms_and_codes():
    """Rows × 2^100 and × 2^-100 (float32 norms inf and 0) code alike, with a float64 reference's norms."""
    d, generator = 16, torch.Generator().manual_seed(0)
    coder = TransformCoder(d, 2.5, norm_dtype=torch.float32)
    coder.calibrate(torch.randn(2000, d, generator=generator) * torch.linspace(3, 0.1, d))
    x = torch.randn(5, d, generator=generator) * torch.linspace(3, 0.1, d)
    huge, tiny = coder.quantize(x * 2.0**100), coder.quantize(x * 2.0**-100)
    assert torch.equal(huge.indices, tiny.indices)
    for code, scale in [(huge, 2.0**100), (tiny, 2.0**-100)]:
        torch.testing.assert_close(code.norms.double(), (x.double() * scale).norm(dim=-1), rtol=1e-6, atol=0)
    same = (huge.indices == coder.quantize(x).indices).float().mean()  # the rows themselves: up to a near tie
    assert same > 0.9


def test_unfitted_coders_and_impossible_budgets_are_refused():
    with pytest.raises(ValueError, match="not fitted"):
        TransformCoder(16, 2).quantize(torch.randn(3, 16))
    with pytest.raises(ValueError, match="whole number of bits"):
        TransformCoder(16, 2.01)
    with pytest.raises(ValueError, match="bits=2.03"):
        make_codec("transform_coding", 16, 2.03)
