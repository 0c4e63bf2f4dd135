"""Fused Prod quantize (Stage-1 codes + QJL sign sketch of the residual) against TurboQuantProd.quantize and a
float64 reference of the same arithmetic."""

import pytest
import torch

pytest.importorskip("triton")

from tqlab.kernels import quantize_prod, quantize_tables  # noqa: E402
from tqlab.quant import Centered, TurboQuantProd, unpack_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEAR_TIE = 1e-5  # |y − boundary| below which fp32 sums may put a coordinate in the neighbouring cell
NEAR_ZERO = 1e-4  # |(S r)_i| below which a sign may differ (tf32x3 on a GPU, another summation order on CPU)


def _reference(codec: TurboQuantProd, x: torch.Tensor):
    """Stage-1 indices, S r and ‖r‖ in float64, from the codec's own rotation, boundaries and projection."""
    x64 = x.double()
    y = (x64 / x64.norm(dim=-1, keepdim=True).clamp_min(1e-300)) @ codec.rotation.matrix().double().T
    idx = torch.bucketize(y, codec.mse.boundaries.double())
    residual = y - codec.mse.centroids.double()[idx]
    near_tie = ((y.unsqueeze(-1) - codec.mse.boundaries.double()).abs() < NEAR_TIE).any(-1)
    return idx, residual @ codec.projection.double().T, residual.norm(dim=-1), near_tie


@pytest.mark.parametrize(  # each product: the ±1 one (bf16/fp16 fast Hadamard, signed halves at 256) and tf32x3
    "dim, bits, rotation, dtype",
    [
        (64, 3, "fast_hadamard", torch.bfloat16),
        (128, 4, "random_haar", torch.float16),
        (128, 5, "fast_hadamard", torch.float32),
        (256, 3, "fast_hadamard", torch.bfloat16),
        (256, 4, "fast_hadamard", torch.float16),
    ],
)
def test_prod_codes_equal_the_codec_up_to_ties(dim, bits, rotation, dtype):
    heads = 2
    codecs = [TurboQuantProd(dim, bits, rotation=rotation, seed=10 * h + bits) for h in range(heads)]
    x = (torch.randn(2, heads, 37, dim, generator=torch.Generator().manual_seed(dim)) * 3).to(dtype)
    x[1, 0, 5] = 0  # a zero vector: y = 0, its residual minus the centroid of 0
    rotations = torch.stack([c.rotation.matrix() for c in codecs]).to(DEVICE)
    projections = torch.stack([c.projection for c in codecs]).to(DEVICE)
    mse = codecs[0].mse
    indices, signs, norms, residual_norms = quantize_prod(
        x.to(DEVICE), rotations, mse.boundaries.to(DEVICE), projections, mse.centroids.to(DEVICE)
    )
    for h, codec in enumerate(codecs):
        code = codec.quantize(x[:, h])
        assert indices[:, h].shape == code.indices.shape and signs[:, h].shape == code.signs.shape
        assert norms.dtype == residual_norms.dtype == torch.float16
        assert torch.equal(norms[:, h].cpu(), code.norms)
        idx, sketch, r_norm, near_tie = _reference(codec, x[:, h])
        ours = unpack_bits(indices[:, h].cpu(), bits - 1, dim)
        assert torch.equal(ours[~near_tie], idx[~near_tie])
        # A coordinate moved across a boundary changes its row's residual: compare the other rows.
        rows = (ours == idx).all(-1)
        assert rows.float().mean() > 0.95
        our_signs = unpack_bits(signs[:, h].cpu(), 1, dim).bool()
        certain = rows[..., None] & (sketch.abs() > NEAR_ZERO)
        assert torch.equal(our_signs[certain], (sketch >= 0)[certain])
        assert torch.equal(our_signs[certain], unpack_bits(code.signs, 1, dim).bool()[certain])
        assert torch.allclose(residual_norms[:, h].cpu().double()[rows], r_norm[rows], rtol=1e-3, atol=0)
        assert torch.allclose(
            residual_norms[:, h].cpu()[rows].float(), code.residual_norms[rows].float(), rtol=1e-3
        )


def test_prod_in_the_tiled_tf32_product(monkeypatch):
    """The sketch is summed tile by tile with the rotation's tiles on a GPU: every tile offset, on CPU too."""
    from tqlab.kernels import quantize

    monkeypatch.setattr(quantize, "INTERPRETER_TILE", quantize.TF32_TILE)
    dim, bits = 128, 3
    codec = TurboQuantProd(dim, bits, rotation="random_haar", seed=2)
    x = torch.randn(45, dim, generator=torch.Generator().manual_seed(4))
    indices, signs, _, residual_norms = quantize_prod(
        x.to(DEVICE), codec.rotation.matrix().to(DEVICE), codec.mse.boundaries.to(DEVICE),
        codec.projection.to(DEVICE), codec.mse.centroids.to(DEVICE),
    )  # fmt: skip
    idx, sketch, r_norm, near_tie = _reference(codec, x)
    ours = unpack_bits(indices.cpu(), bits - 1, dim)
    assert torch.equal(ours[~near_tie], idx[~near_tie])
    rows = (ours == idx).all(-1)
    assert rows.float().mean() > 0.95
    certain = rows[:, None] & (sketch.abs() > NEAR_ZERO)
    assert torch.equal(unpack_bits(signs.cpu(), 1, dim).bool()[certain], (sketch >= 0)[certain])
    assert torch.allclose(residual_norms.cpu().double()[rows], r_norm[rows], rtol=1e-3)


def test_centered_prod_codes_equal_the_centered_codec():
    """mean=μ: Stage-1 codes, signs and ‖r‖ of x − μ, as Centered(codec, μ) stores them (bf16: the ±1 product)."""
    dim, bits = 64, 3
    codec = TurboQuantProd(dim, bits, rotation="fast_hadamard", seed=6)
    mean = 20 * torch.randn(dim, generator=torch.Generator().manual_seed(7))
    x = (mean + torch.randn(41, dim, generator=torch.Generator().manual_seed(8))).to(torch.bfloat16)
    indices, signs, norms, residual_norms = quantize_prod(
        x.to(DEVICE), codec.rotation.matrix().to(DEVICE), codec.mse.boundaries.to(DEVICE),
        codec.projection.to(DEVICE), codec.mse.centroids.to(DEVICE), mean=mean.to(DEVICE),
    )  # fmt: skip
    code = Centered(codec, mean).quantize(x)
    idx, sketch, r_norm, near_tie = _reference(codec, x.float() - mean)
    ours = unpack_bits(indices.cpu(), bits - 1, dim)
    assert torch.equal(ours[~near_tie], idx[~near_tie])
    assert not ((ours != unpack_bits(code.indices, bits - 1, dim)) & ~near_tie).any()
    rows = (ours == idx).all(-1)
    certain = rows[:, None] & (sketch.abs() > NEAR_ZERO)
    assert rows.float().mean() > 0.95
    assert torch.equal(unpack_bits(signs.cpu(), 1, dim).bool()[certain], (sketch >= 0)[certain])
    assert torch.allclose(residual_norms.cpu().double()[rows], r_norm[rows], rtol=1e-3)
    torch.testing.assert_close(norms.cpu().float(), code.norms.float(), rtol=1e-3, atol=0)


def test_prod_needs_its_projection_in_the_tables():
    codec = TurboQuantProd(64, 3)
    matrix, mse = codec.rotation.matrix(), codec.mse
    plain = quantize_tables(matrix, mse.boundaries, torch.float32)
    with pytest.raises(ValueError, match="lack Prod's projection"):
        quantize_prod(
            torch.zeros(3, 64), matrix, mse.boundaries, codec.projection, mse.centroids, tables=plain
        )
    per_head = torch.stack([matrix] * 2)
    with pytest.raises(ValueError, match=r"tables hold a \(64, 64\) projection"):
        quantize_prod(
            torch.zeros(2, 3, 64), per_head, mse.boundaries, torch.stack([codec.projection] * 2), mse.centroids,
            tables=quantize_tables(matrix, mse.boundaries, torch.float32, codec.projection, mse.centroids),
        )  # fmt: skip
    with pytest.raises(ValueError, match="qjl_dim = head_dim"):
        quantize_prod(torch.zeros(3, 64), matrix, mse.boundaries, codec.projection[:32], mse.centroids)


def test_prod_codes_written_into_a_store_land_at_the_device_count():
    """into/at with Prod's four tensors: a plain call's codes, signs and norms at tokens at..at + T."""
    dim, bits, heads, capacity, first = 64, 3, 2, 6, 4
    codecs = [TurboQuantProd(dim, bits, rotation="fast_hadamard", seed=h) for h in range(heads)]
    rotation = torch.stack([c.rotation.matrix() for c in codecs]).to(DEVICE)
    projection = torch.stack([c.projection for c in codecs]).to(DEVICE)
    mse = codecs[0].mse
    args = (rotation, mse.boundaries.to(DEVICE), projection, mse.centroids.to(DEVICE))
    x = torch.randn(2, heads, 2, dim, generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.bfloat16)
    plain = quantize_prod(x, *args)
    store = tuple(
        torch.full((2, heads, capacity, *t.shape[3:]), 7, dtype=t.dtype, device=DEVICE) for t in plain
    )
    quantize_prod(x, *args, into=store, at=torch.tensor(first, device=DEVICE))
    for got, want in zip(store, plain, strict=True):
        assert torch.equal(got[:, :, first:], want)
        assert (got[:, :, :first] == 7).all()
