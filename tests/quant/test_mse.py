"""TurboQuantMSE: storage, dtype handling and decoding checked against float64 references."""

import pytest
import torch

from tqlab.quant import TurboQuantMSE, lloyd_max_codebook, packed_row_bytes


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7, 8])
def test_decoding_matches_a_float64_nearest_centroid_reference(bits):
    d = 64
    q = TurboQuantMSE(d, bits, seed=3, norm_dtype=torch.float32)
    x = gaussian(257, d, seed=bits) * 3
    x_hat = q.dequantize(q.quantize(x))
    # reference: rotate with the dense matrix in float64, brute-force argmin over the codebook
    rot = q.rotation.matrix().double()
    centroids = torch.tensor(lloyd_max_codebook(d, bits)[0])
    norms = x.double().norm(dim=-1, keepdim=True)
    y = (x.double() / norms) @ rot.T
    nearest = centroids[(y.unsqueeze(-1) - centroids).abs().argmin(-1)]
    reference = (nearest @ rot) * norms
    assert x_hat.dtype == torch.float32
    # ties at a boundary can flip in fp32; allow a handful of coordinates out of 16k
    close = torch.isclose(x_hat.double(), reference, atol=1e-4, rtol=1e-4)
    assert close.float().mean() > 0.999


def test_storage_is_packed_indices_plus_one_norm_per_vector():
    q = TurboQuantMSE(128, 3)
    code = q.quantize(gaussian(4, 10, 128))
    assert code.indices.shape == (4, 10, 48) and code.indices.dtype == torch.uint8
    assert code.nbytes == 40 * (48 + 2)
    assert code.bits_per_coordinate == pytest.approx(3 + 16 / 128)
    assert (
        TurboQuantMSE(128, 3, norm_dtype=torch.float32).quantize(gaussian(5, 128)).bits_per_coordinate == 3.25
    )
    assert packed_row_bytes(128, 3) == 48


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs_are_coded_in_fp32(dtype):
    q = TurboQuantMSE(64, 4, norm_dtype=torch.float32)
    x = gaussian(100, 64, dtype=dtype)
    out = q.dequantize(q.quantize(x))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, q.dequantize(q.quantize(x.float())))


def test_zero_vectors_round_trip_to_zero():
    q = TurboQuantMSE(64, 2)
    x = gaussian(3, 64)
    x[1] = 0
    out = q.dequantize(q.quantize(x))
    assert torch.equal(out[1], torch.zeros(64))


def test_nan_and_inf_are_refused():
    q = TurboQuantMSE(64, 2)
    for bad in (float("nan"), float("inf")):
        x = gaussian(2, 64)
        x[0, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            q.quantize(x)


def test_norm_correction_preserves_the_stored_norm():
    q = TurboQuantMSE(64, 2, norm_correction=True, norm_dtype=torch.float32)
    x = gaussian(50, 64) * 7
    torch.testing.assert_close(q.dequantize(q.quantize(x)).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_score_equals_inner_products_with_decoded_keys():
    q = TurboQuantMSE(64, 3, rotation="fast_hadamard")
    keys, queries = gaussian(2, 30, 64, seed=1), gaussian(2, 5, 64, seed=2)
    code = q.quantize(keys)
    expected = queries.double() @ q.dequantize(code).double().transpose(-1, -2)
    torch.testing.assert_close(q.score(queries, code).double(), expected, rtol=1e-4, atol=1e-4)


def test_bad_arguments_name_the_argument_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"bits=0 .* 1\.\.8"):
        TurboQuantMSE(64, 0)
    with pytest.raises(ValueError, match=r"bits=2\.5 .*MixedPrecision"):
        TurboQuantMSE(64, 2.5)
    with pytest.raises(ValueError, match="divisible by 8"):
        TurboQuantMSE(60, 2, rotation="block_so8_static")
    with pytest.raises(ValueError, match="power of two"):
        TurboQuantMSE(96, 2, rotation="fast_hadamard")
    q = TurboQuantMSE(64, 2)
    with pytest.raises(ValueError, match="dim=64"):
        q.quantize(gaussian(3, 32))
    with pytest.raises(ValueError, match="codec's tensors are on cpu"):
        q.quantize(torch.zeros(3, 64, device="meta"))


def test_a_code_decodes_only_with_a_codec_of_its_own_dim_and_bits():
    """64 dims at 4 bits and 128 at 2 pack into the same 32 bytes: nothing but the code's fields tells them
    apart, and a decode with the other codec would return vectors of the wrong length and values."""
    code = TurboQuantMSE(128, 2).quantize(gaussian(3, 128))
    other = TurboQuantMSE(64, 4)
    for decode in (other.dequantize, other.rotated_centroids, lambda c: other.score(gaussian(1, 64), c)):
        with pytest.raises(ValueError, match=r"\(dim=64, bits=4\) cannot decode a code of dim=128, bits=2"):
            decode(code)


def test_norms_are_stored_only_in_float_dtypes_and_an_empty_code_has_no_bits_per_coordinate():
    with pytest.raises(ValueError, match=r"norm_dtype=torch.int32 is not allowed; choose from torch.float16"):
        TurboQuantMSE(64, 2, norm_dtype=torch.int32)
    empty = TurboQuantMSE(64, 2).quantize(torch.zeros(0, 64))
    with pytest.raises(ValueError, match=r"holds no vectors \(shape \(0,\)\)"):
        float(empty.bits_per_coordinate)


@pytest.mark.parametrize("bits", [2, 4])
def test_tiny_and_huge_rows_keep_their_norms_and_codes_on_the_tensor_path(bits, monkeypatch):
    """A row whose float32 squares underflow (× 2^-100) or overflow (× 2^100) codes as the row itself and keeps a
    float64 reference's norm, where a float32 norm comes out 0 or inf."""
    from tqlab.quant import native, unpack_bits

    monkeypatch.setattr(native, "library", lambda: None)
    codec = TurboQuantMSE(64, bits, rotation="fast_hadamard", seed=bits, norm_dtype=torch.float32)
    x = gaussian(4, 64)
    scaled = torch.cat([x * 2.0**-100, x * 2.0**100])  # exact in float32
    assert (scaled[:4].norm(dim=-1) == 0).all() and scaled[4:].norm(dim=-1).isinf().all()
    code = codec.quantize(scaled)
    y = (x.double() / x.double().norm(dim=-1, keepdim=True)) @ codec.rotation.dense().double().T
    expected = (y[..., None] > codec.boundaries.double()).sum(-1)
    clear = (y[..., None] - codec.boundaries.double()).abs().amin(-1) > 1e-5
    codes = unpack_bits(code.indices, bits, 64)
    assert torch.equal(codes[:4][clear], expected[clear]) and torch.equal(codes[4:][clear], expected[clear])
    torch.testing.assert_close(code.norms.double(), scaled.double().norm(dim=-1), rtol=1e-6, atol=0)


def test_norm_overflow_in_fp16_is_refused_clearly():
    with pytest.raises(ValueError, match="norm_dtype"):
        TurboQuantMSE(64, 2).quantize(torch.full((1, 64), 1e4))


def test_unbiased_decoding_makes_inner_products_unbiased_over_rotations():
    from tqlab.quant import coordinate_distortion
    from tqlab.rotation.base import haar_orthogonal

    d, bits, n = 32, 1, 20_000
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(d, generator=g), torch.randn(d, generator=g)
    # the expectation over the codec's random rotation equals that over random rotations R of the pair
    r = haar_orthogonal((n, d, d), seed=1).float()
    rx, rq = r @ x, r @ q
    exact, shrink = float(q @ x), 1 - coordinate_distortion(d, bits)
    for flag, expected in ((True, exact), (False, shrink * exact)):
        c = TurboQuantMSE(d, bits, rotation="random_haar", seed=0, unbiased=flag, norm_dtype=torch.float32)
        products = (rq * c.dequantize(c.quantize(rx))).sum(-1).double()
        se = products.std().item() / n**0.5
        assert abs(products.mean().item() - expected) < 4 * se
    assert abs(shrink * exact - exact) > 20 * se  # plain decoding is biased by the factor 1 − D
    with pytest.raises(ValueError, match="choose one"):
        TurboQuantMSE(d, bits, norm_correction=True, unbiased=True)


@pytest.mark.parametrize("path", ["native", "tensor"])
@pytest.mark.parametrize("codec_class", ["mse", "prod"])
def test_large_inputs_are_coded_in_row_blocks_as_a_float64_reference_codes_them(
    codec_class, path, monkeypatch
):
    """On a CPU, rows go through quantize in blocks (whose temporaries stay in cache), on the native encode and
    on the tensor path: every code as a float64 reference computes it, up to boundary ties."""
    from tqlab.quant import TurboQuantProd, codes, native, unpack_bits

    if path == "tensor":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler: the codecs use their tensor path")
    monkeypatch.setattr(codes, "CPU_BLOCK_ELEMENTS", (1 << 15) // torch.get_num_threads())  # 128 rows of 256
    d, bits = 256, 3
    codec = TurboQuantMSE(d, bits, seed=4) if codec_class == "mse" else TurboQuantProd(d, bits, seed=4)
    mse = codec if codec_class == "mse" else codec.mse
    blocks = []
    rotate = mse.rotation.apply
    monkeypatch.setattr(mse.rotation, "apply", lambda rows: blocks.append(len(rows)) or rotate(rows))
    x = gaussian(3, 100, d, seed=5) * 2
    code = codec.quantize(x)
    block = codes.CPU_BLOCK_ELEMENTS * torch.get_num_threads() // d
    assert (
        blocks == [block, block, 300 - 2 * block] and code.shape == (3, 100) and code.norms.shape == (3, 100)
    )
    y = (x.double() / x.double().norm(dim=-1, keepdim=True)) @ mse.rotation.matrix().double().T
    boundaries = mse.boundaries.double()
    idx = torch.bucketize(y, boundaries)
    tie = ((y.unsqueeze(-1) - boundaries).abs() < 1e-5).any(-1)
    ours = unpack_bits(code.indices, mse.bits, d)
    assert torch.equal(ours[~tie], idx[~tie])
    torch.testing.assert_close(code.norms.float(), x.norm(dim=-1), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=r"dim=256; got a tensor of shape \(3, 100, 128\)"):
        codec.quantize(gaussian(3, 100, 128))  # the whole input named, not a block of it
    if codec_class == "prod":
        sketch = (y - mse.centroids.double()[idx]) @ codec.projection.double().T
        rows = ~tie.any(-1, keepdim=True) & (sketch.abs() > 1e-4)
        signs = unpack_bits(code.signs, 1, d).bool()
        assert torch.equal(signs[rows.expand_as(signs)], (sketch >= 0)[rows.expand_as(signs)])


@pytest.mark.parametrize("rotation", ["fast_hadamard", "random_haar"])
def test_a_single_vector_codes_as_a_batch_of_one_and_tiny_norms_code_as_unit_vectors(rotation):
    from tqlab.quant import TurboQuantProd

    for codec in (TurboQuantMSE(64, 3, rotation=rotation), TurboQuantProd(64, 3, rotation=rotation)):
        x = torch.randn(64, generator=torch.Generator().manual_seed(1))
        one, batch = codec.quantize(x), codec.quantize(x[None])
        assert torch.equal(one.indices, batch.indices[0]) and torch.equal(one.norms, batch.norms[0])
    # norms below float32's smallest normal number (stored exactly as float32): divided by the norm itself
    codec = TurboQuantMSE(128, 4, rotation=rotation, norm_dtype=torch.float32, seed=5)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    for scale in (1.0, 1e-40):
        y = (x * scale).double()
        error = (codec.dequantize(codec.quantize(x * scale)).double() - y).pow(2).sum() / y.pow(2).sum()
        assert error < 0.02, scale  # 4 bits: D_mse ≈ 0.009
