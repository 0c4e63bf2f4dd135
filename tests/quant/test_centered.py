"""Mean removal around a codec: what it stores, and that it wins exactly where the mean dominates."""

import pytest
import torch

from tqlab.quant import Centered, TurboQuantMSE


def _keys(n=4000, dim=64, offset=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = offset * torch.randn(dim, generator=g) / dim**0.5  # ‖μ‖ ≈ offset, the spread ≈ 1 per vector
    return mean + torch.randn(n, dim, generator=g) / dim**0.5, mean


def test_centering_a_dominant_mean_lowers_the_error_by_the_energy_it_removes():
    x, _ = _keys()
    train, test = x[:2000], x[2000:]
    plain = TurboQuantMSE(64, 3, "random_haar", seed=0)
    centered = Centered(TurboQuantMSE(64, 3, "random_haar", seed=0), train.mean(0))
    err = {
        name: ((c.dequantize(c.quantize(test)) - test).norm(dim=-1) ** 2).mean()
        / (test.norm(dim=-1) ** 2).mean()
        for name, c in (("plain", plain), ("centered", centered))
    }
    # TurboQuant's relative error is ≈ D(b) of the coded vector's energy: ‖x‖² plain, ‖x − μ‖² centered
    energy = (test.norm(dim=-1) ** 2).mean() / ((test - train.mean(0)).norm(dim=-1) ** 2).mean()
    assert float(err["plain"] / err["centered"]) == pytest.approx(float(energy), rel=0.15)


def test_scores_add_the_mean_so_codes_and_exact_tokens_share_one_scale():
    x, _ = _keys(n=50, seed=1)
    codec = Centered(TurboQuantMSE(64, 2, "fast_hadamard", seed=3), x.mean(0))
    code = codec.quantize(x)
    q = torch.randn(7, 64, dtype=torch.float64)
    want = q @ codec.dequantize(code).double().T  # float64 over the decoded vectors, mean included
    torch.testing.assert_close(codec.score(q, code).double(), want, atol=1e-5, rtol=0)


def test_the_mean_is_a_stored_constant_and_codes_are_unchanged_in_size():
    x, mean = _keys(n=10)
    inner = TurboQuantMSE(64, 3, "fast_hadamard", seed=0)
    codec = Centered(TurboQuantMSE(64, 3, "fast_hadamard", seed=0), mean)
    assert codec.constant_nbytes() == inner.constant_nbytes() + 64 * 4
    assert codec.quantize(x).nbytes == inner.quantize(x).nbytes
