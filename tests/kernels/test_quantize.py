"""Fused quantize against TurboQuantMSE.quantize and a float64 nearest-centroid reference."""

import pytest
import torch

pytest.importorskip("triton")

from tqlab.kernels import quantize_mse, quantize_prod, quantize_tables  # noqa: E402
from tqlab.quant import (  # noqa: E402
    Centered,
    TurboQuantMSE,
    TurboQuantProd,
    lloyd_max_codebook,
    pack_bits,
    unpack_bits,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEAR_TIE = 1e-5  # |y − boundary| of a unit vector's rotated coordinate below which fp32 sums may disagree


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codes_equal_the_codec_and_a_float64_reference_up_to_boundary_ties(dim, bits):
    # every width meets both products: the exact ±1 one (fast Hadamard, bf16/fp16) and the tf32x3 one
    rotation, dtype = [
        ("fast_hadamard", torch.bfloat16),
        ("fast_hadamard", torch.float32),
        ("random_haar", torch.float16),
    ][(dim.bit_length() + bits) % 3]
    codec = TurboQuantMSE(dim, bits, rotation=rotation, seed=dim + bits)
    x = (torch.randn(2, 35, dim, generator=torch.Generator().manual_seed(bits)) * 4).to(dtype)
    x[1, 3] = 0  # a zero vector codes as y = 0
    matrix = codec.rotation.matrix()
    indices, norms = quantize_mse(x.to(DEVICE), matrix.to(DEVICE), codec.boundaries.to(DEVICE))
    indices, norms = indices.cpu(), norms.cpu()
    code = codec.quantize(x)
    assert indices.shape == code.indices.shape and indices.dtype == torch.uint8
    assert norms.dtype == torch.float16

    # float64 reference: nearest Lloyd-Max centroid of each rotated coordinate, packed by pack_bits
    x64 = x.double()
    y = (x64 / x64.norm(dim=-1, keepdim=True).clamp_min(1e-300)) @ matrix.double().T
    boundaries = torch.tensor(lloyd_max_codebook(dim, bits)[1])
    expected = torch.bucketize(y, boundaries)
    near_tie = ((y.unsqueeze(-1) - boundaries).abs() < NEAR_TIE).any(-1)
    ours = unpack_bits(indices, bits, dim)
    assert torch.equal(ours[~near_tie], expected[~near_tie])
    assert ((ours - expected).abs() <= 1).all()
    if not near_tie.any():
        assert torch.equal(indices, pack_bits(expected, bits))
    # The codec's own bytes: identical up to the same ties.
    differ = unpack_bits(code.indices, bits, dim) != ours
    assert not (differ & ~near_tie).any()
    # Norms: fp16 of ‖x‖; a different fp32 summation order may move a tie by one fp16 ulp.
    ulps = (
        (norms.float() - code.norms.float()).abs()
        / torch.finfo(torch.float16).eps
        / code.norms.float().clamp_min(1e-3)
    )
    assert (ulps <= 1.01).all() and (norms == code.norms).float().mean() > 0.95


@pytest.mark.parametrize(  # tf32x3; the signed halves at every width (int16, three-int32 and int32 stores)
    "dim, dtype, bits",
    [(64, torch.float32, 3), (256, torch.bfloat16, 2), (256, torch.bfloat16, 3), (256, torch.bfloat16, 4)],
)
def test_each_kv_head_is_coded_with_its_own_rotation(dim, dtype, bits):
    heads = 3
    codecs = [TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=h) for h in range(heads)]
    x = torch.randn(2, heads, 70, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    rotations = torch.stack([c.rotation.matrix() for c in codecs])
    indices, norms = quantize_mse(x.to(DEVICE), rotations.to(DEVICE), codecs[0].boundaries.to(DEVICE))
    for h, codec in enumerate(codecs):
        code = codec.quantize(x[:, h])
        assert torch.equal(norms[:, h].cpu(), code.norms)
        differ = (unpack_bits(indices[:, h].cpu(), bits, dim) != unpack_bits(code.indices, bits, dim)).float()
        assert differ.mean() < 1e-3  # fp32 summation order only moves coordinates at a boundary tie


@pytest.mark.parametrize(  # the ±1 product, its signed halves (d = 256) and tf32x3 (fp32 input)
    "dim, dtype, bits", [(128, torch.bfloat16, 4), (256, torch.bfloat16, 3), (64, torch.float32, 2)]
)
def test_centered_codes_equal_the_centered_codec_and_a_float64_reference(dim, dtype, bits):
    """mean=μ codes x − μ as Centered(codec, μ) does, with μ far larger than x − μ (a key bias): the ±1
    product subtracts (√d Π) μ from its output, so a slip there or in the norm moves nearly every code."""
    heads = 2
    codecs = [TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=h) for h in range(heads)]
    generator = torch.Generator().manual_seed(dim)
    means = 20 * torch.randn(heads, dim, generator=generator)
    x = (means[None, :, None] + torch.randn(2, heads, 33, dim, generator=generator)).to(dtype)
    rotations = torch.stack([c.rotation.matrix() for c in codecs])
    indices, norms = quantize_mse(
        x.to(DEVICE), rotations.to(DEVICE), codecs[0].boundaries.to(DEVICE), mean=means.to(DEVICE)
    )
    for h, codec in enumerate(codecs):
        code = Centered(codec, means[h]).quantize(x[:, h])
        torch.testing.assert_close(norms[:, h].cpu().float(), code.norms.float(), rtol=1e-3, atol=0)
        c64 = x[:, h].double() - means[h].double()
        y = (c64 / c64.norm(dim=-1, keepdim=True)) @ rotations[h].double().T
        near_tie = ((y.unsqueeze(-1) - codec.boundaries.double()).abs() < NEAR_TIE).any(-1)
        ours = unpack_bits(indices[:, h].cpu(), bits, dim)
        assert torch.equal(ours[~near_tie], torch.bucketize(y, codec.boundaries.double())[~near_tie])
        assert not ((ours != unpack_bits(code.indices, bits, dim)) & ~near_tie).any()
    with pytest.raises(ValueError, match="centered codes need both"):
        tables = quantize_tables(rotations, codecs[0].boundaries, dtype)
        quantize_mse(x, rotations, codecs[0].boundaries, tables=tables, mean=means)


def _store(shapes, capacity: int, device=DEVICE):
    """A cache-like store of `capacity` tokens per row, filled with a marker that no code or norm equals."""
    return tuple(
        torch.full((*lead, capacity, *rest), 0xA5, dtype=torch.uint8, device=device)
        if rest
        else torch.full((*lead, capacity), -3.0, dtype=torch.float16, device=device)
        for lead, rest in shapes
    )


@pytest.mark.parametrize(  # per-head rotations with the signed halves (d = 256); one shared rotation
    "dim, bits, heads", [(64, 3, 2), (256, 4, 2), (128, 2, None)]
)
def test_codes_written_into_a_store_land_at_the_device_count(dim, bits, heads):
    """into/at (a frozen cache's step): x's codes are those of a plain call, at tokens at..at + T of every
    row of the store; every other token keeps what it held."""
    generator = torch.Generator().manual_seed(dim + bits)
    codecs = [TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=h) for h in range(heads or 1)]
    rotation = torch.stack([c.rotation.matrix() for c in codecs]) if heads else codecs[0].rotation.matrix()
    lead, tokens, capacity, first = (3, heads or 2), 2, 9, 5
    x = torch.randn(*lead, tokens, dim, generator=generator).to(DEVICE, torch.bfloat16)
    rotation, boundaries = rotation.to(DEVICE), codecs[0].boundaries.to(DEVICE)
    plain = quantize_mse(x, rotation, boundaries)
    store = _store([(lead, (dim // 8 * bits,)), (lead, ())], capacity)
    before = [t.clone() for t in store]
    written = quantize_mse(x, rotation, boundaries, into=store, at=torch.tensor(first, device=DEVICE))
    assert all(w is s for w, s in zip(written, store, strict=True))
    for got, old, want in zip(store, before, plain, strict=True):
        assert torch.equal(got[:, :, first : first + tokens], want)
        others = torch.ones(capacity, dtype=torch.bool)
        others[first : first + tokens] = False
        assert torch.equal(got[:, :, others], old[:, :, others])


@pytest.mark.parametrize("first", [-1, 8])
def test_a_position_past_either_end_of_the_store_writes_only_inside_it(first):
    """`at` is read on the device, so it is not checked: rows it puts before token 0 or past the capacity are
    dropped, and no other row of the store (another head's, another sequence's) changes."""
    codec = TurboQuantMSE(64, 2, rotation="fast_hadamard")
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    rotation, boundaries = codec.rotation.matrix().to(DEVICE), codec.boundaries.to(DEVICE)
    plain = quantize_mse(x, rotation, boundaries)
    store = _store([((2,), (16,)), ((2,), ())], 9)
    before = [t.clone() for t in store]
    quantize_mse(x, rotation, boundaries, into=store, at=torch.tensor(first, device=DEVICE))
    inside = [t for t in range(3) if 0 <= first + t < 9]  # x's tokens that land in the store
    for got, old, want in zip(store, before, plain, strict=True):
        assert torch.equal(got[:, [first + t for t in inside]], want[:, inside])
        untouched = [t for t in range(9) if t - first not in inside]
        assert torch.equal(got[:, untouched], old[:, untouched])


@pytest.mark.parametrize("prod", [False, True])
def test_norms_past_a_limit_set_the_overflow_flag_and_are_stored_as_they_are(prod):
    """norm_limit (the cache gives values fp16's 65 504, which the decode kernels weight as fp16 operands): a
    float32 norm past it is stored exactly and flags the call; the same rows under the limit do not."""
    dim = 64
    codec = (TurboQuantProd if prod else TurboQuantMSE)(dim, 3, rotation="fast_hadamard", seed=1)
    mse = codec.mse if prod else codec
    x = torch.randn(2, 9, dim, generator=torch.Generator().manual_seed(2)).to(DEVICE) * 4
    x[1, 3] *= 1e4  # a norm ~3e5
    extra = (codec.projection.to(DEVICE), mse.centroids.to(DEVICE)) if prod else ()
    quantize = quantize_prod if prod else quantize_mse
    for limit, flagged in [(65504.0, 1), (1e6, 0)]:
        overflow = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        fields = quantize(
            x, mse.rotation.matrix().to(DEVICE), mse.boundaries.to(DEVICE), *extra, torch.float32,
            overflow=overflow, norm_limit=limit,
        )  # fmt: skip
        norms = fields[2 if prod else 1].cpu()
        assert int(overflow.item()) == flagged
        torch.testing.assert_close(norms, x.cpu().float().norm(dim=-1), rtol=1e-6, atol=0)


def test_norm_dtypes_that_are_not_floats_the_codecs_store_are_refused():
    codec = TurboQuantMSE(64, 2)
    with pytest.raises(ValueError, match=r"norm_dtype=torch.int32 is not allowed; choose from torch.float16"):
        quantize_mse(torch.zeros(2, 64), codec.rotation.matrix(), codec.boundaries, norm_dtype=torch.int32)


def test_a_store_of_another_shape_or_no_position_is_refused():
    codec = TurboQuantMSE(64, 2)
    x, matrix = torch.zeros(2, 3, 64), codec.rotation.matrix()
    at = torch.tensor(0)
    store = _store([((2,), (16,)), ((2,), ())], 4, "cpu")
    with pytest.raises(ValueError, match="pass both or neither"):
        quantize_mse(x, matrix, codec.boundaries, at=at)
    with pytest.raises(ValueError, match="into needs at"):
        quantize_mse(x, matrix, codec.boundaries, into=store)
    with pytest.raises(ValueError, match="into needs at"):
        quantize_mse(x, matrix, codec.boundaries, into=store, at=at.short())
    with pytest.raises(
        ValueError,
        match=r"into's indices is \(2, 4, 16\) torch.uint8 on cpu; expected a contiguous \(2, 4, 24\)",
    ):
        quantize_mse(x, matrix, TurboQuantMSE(64, 3).boundaries, into=store, at=at)
    with pytest.raises(ValueError, match="fewer than x's 3"):
        quantize_mse(x, matrix, codec.boundaries, into=_store([((2,), (16,)), ((2,), ())], 2, "cpu"), at=at)
    with pytest.raises(ValueError, match="into takes 2 tensors"):
        quantize_mse(x, matrix, codec.boundaries, into=store[:1], at=at)
    with pytest.raises(ValueError, match="with a token axis; x has shape"):
        quantize_mse(x[0, 0], matrix, codec.boundaries, into=store, at=at)
    with pytest.raises(ValueError, match=r"expected a contiguous \(2, 'capacity', 16\)"):
        quantize_mse(x, matrix, codec.boundaries, into=(store[0][:, 0], store[1]), at=at)


@pytest.mark.parametrize("bits", [3, 4])
def test_the_tiled_tf32_product_codes_as_the_codec(bits, monkeypatch):
    """On a GPU the general product runs in tiles of TF32_TILE; the interpreter takes one tile unless told."""
    from tqlab.kernels import quantize

    monkeypatch.setattr(quantize, "INTERPRETER_TILE", quantize.TF32_TILE)
    dim = 128  # four tiles along each axis: every tile offset, and 3-bit words stored past the first tile
    codec = TurboQuantMSE(dim, bits, rotation="random_haar", seed=5)
    x = torch.randn(70, dim, generator=torch.Generator().manual_seed(3))
    indices, norms = quantize_mse(
        x.to(DEVICE), codec.rotation.matrix().to(DEVICE), codec.boundaries.to(DEVICE)
    )
    code = codec.quantize(x)
    assert torch.equal(norms.cpu(), code.norms)
    differ = unpack_bits(indices.cpu(), bits, dim) != unpack_bits(code.indices, bits, dim)
    assert differ.float().mean() < 1e-3  # fp32 summation order only moves coordinates at a boundary tie


def test_the_sign_product_is_chosen_only_for_a_scaled_sign_matrix_and_low_precision_input():
    for dim in (64, 128):  # √128 is not a float: its ±1/√d entries are ±1 after scaling only up to round-off
        hadamard = TurboQuantMSE(dim, 2, rotation="fast_hadamard").rotation.matrix()
        tables = quantize_tables(hadamard, TurboQuantMSE(dim, 2).boundaries, torch.bfloat16)
        assert tables.signs and set(tables.matrix.unique().tolist()) == {-1.0, 1.0}
    hadamard = TurboQuantMSE(64, 2, rotation="fast_hadamard").rotation.matrix()
    haar = TurboQuantMSE(64, 2, rotation="random_haar").rotation.matrix()
    boundaries = TurboQuantMSE(64, 2).boundaries
    assert not quantize_tables(hadamard, boundaries, torch.float32).signs
    assert not quantize_tables(haar, boundaries, torch.bfloat16).signs
    assert quantize_tables(haar, boundaries, torch.bfloat16).symmetric
    assert not quantize_tables(haar, boundaries + 0.01, torch.bfloat16).symmetric


def test_a_sign_matrix_without_signed_halves_takes_the_whole_product():
    dim, bits = 256, 2
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=4)
    hadamard = codec.rotation.matrix()
    halves = quantize_tables(hadamard, codec.boundaries, torch.bfloat16).row_signs
    assert halves is not None and set(halves.unique().tolist()) == {-1.0, 1.0}
    assert quantize_tables(torch.stack([hadamard] * 2), codec.boundaries, torch.bfloat16).row_signs.shape == (
        2, 2, dim // 2,
    )  # fmt: skip
    # Swapping two columns across the halves keeps Π orthogonal and ±1/√d but breaks the structure.
    swapped = hadamard.clone()
    swapped[:, [0, dim - 1]] = swapped[:, [dim - 1, 0]]
    tables = quantize_tables(swapped, codec.boundaries, torch.bfloat16)
    assert tables.signs and tables.row_signs is None
    x = torch.randn(40, dim, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    indices, _ = quantize_mse(x.to(DEVICE), swapped.to(DEVICE), codec.boundaries.to(DEVICE))
    y = (x.double() / x.double().norm(dim=-1, keepdim=True)) @ swapped.double().T
    near_tie = ((y.unsqueeze(-1) - codec.boundaries.double()).abs() < NEAR_TIE).any(-1)
    ours = unpack_bits(indices.cpu(), bits, dim)
    assert torch.equal(ours[~near_tie], torch.bucketize(y, codec.boundaries.double())[~near_tie])


def test_asymmetric_boundaries_are_counted_in_full():
    dim, bits = 64, 3
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=1)
    boundaries = codec.boundaries + 0.02  # no longer symmetric about 0
    x = torch.randn(50, dim, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    matrix = codec.rotation.matrix()
    indices, _ = quantize_mse(x.to(DEVICE), matrix.to(DEVICE), boundaries.to(DEVICE))
    y = (x.double() / x.double().norm(dim=-1, keepdim=True)) @ matrix.double().T
    near_tie = ((y.unsqueeze(-1) - boundaries.double()).abs() < NEAR_TIE).any(-1)
    ours = unpack_bits(indices.cpu(), bits, dim)
    assert torch.equal(ours[~near_tie], torch.bucketize(y, boundaries.double())[~near_tie])


@pytest.mark.parametrize(  # the ±1 product (binary search), its signed halves, the general tf32 one (linear count)
    "dim, dtype, rotation",
    [
        (128, torch.bfloat16, "fast_hadamard"),
        (256, torch.bfloat16, "fast_hadamard"),
        (64, torch.float32, "random_haar"),
    ],
)
def test_sign_magnitude_labels_are_the_codecs_indices_relabelled(dim, dtype, rotation):
    from tqlab.kernels.packed import sign_magnitude

    codec = TurboQuantMSE(dim, 4, rotation=rotation, seed=6)
    x = (torch.randn(3, 40, dim, generator=torch.Generator().manual_seed(6)) * 2).to(dtype)
    matrix, boundaries = codec.rotation.matrix().to(DEVICE), codec.boundaries.to(DEVICE)
    tables = quantize_tables(matrix, boundaries, x.dtype, sign_magnitude=True)
    labels, norms = quantize_mse(x.to(DEVICE), matrix, boundaries, tables=tables)
    plain, plain_norms = quantize_mse(x.to(DEVICE), matrix, boundaries)
    assert torch.equal(norms, plain_norms) and not torch.equal(labels, plain)
    assert torch.equal(sign_magnitude(labels), plain)
    # label l: index l below 8, else l ^ 7 (a float64 bucketing, ties at a boundary apart)
    y = (x.double() / x.double().norm(dim=-1, keepdim=True)) @ codec.rotation.matrix().double().T
    near_tie = ((y.unsqueeze(-1) - codec.boundaries.double()).abs() < NEAR_TIE).any(-1)
    index = torch.bucketize(y, codec.boundaries.double())
    expected = torch.where(index >= 8, index ^ 7, index)
    assert torch.equal(unpack_bits(labels.cpu(), 4, dim)[~near_tie], expected[~near_tie])


def test_sign_magnitude_labels_only_for_symmetric_4_bit_mse_codes():
    for bits, shift, prod in ((3, 0.0, False), (4, 0.02, False), (4, 0.0, True)):
        codec = TurboQuantProd(64, bits + 1) if prod else TurboQuantMSE(64, bits)
        mse = codec.mse if prod else codec
        extra = (codec.projection, mse.centroids) if prod else ()
        with pytest.raises(ValueError, match="sign_magnitude labels are for TurboQuant-MSE codes of 4 bits"):
            quantize_tables(
                mse.rotation.matrix(), mse.boundaries + shift, torch.float32, *extra, sign_magnitude=True
            )


def test_tables_of_another_codec_are_refused():
    """Tables are built once by the caller; ones built for another width or rotation would code silently wrong."""
    narrow, wide = TurboQuantMSE(64, 2), TurboQuantMSE(64, 3)
    tables = quantize_tables(narrow.rotation.matrix(), narrow.boundaries, torch.float32)
    with pytest.raises(ValueError, match="3 boundaries, not these"):
        quantize_mse(torch.zeros(3, 64), wide.rotation.matrix(), wide.boundaries, tables=tables)
    per_head = torch.stack([narrow.rotation.matrix()] * 2)
    with pytest.raises(ValueError, match=r"built for a \(64, 64\) rotation"):
        quantize_mse(torch.zeros(2, 3, 64), per_head, narrow.boundaries, tables=tables)


def test_rows_need_a_matching_square_rotation():
    codec = TurboQuantMSE(64, 2)
    with pytest.raises(ValueError, match=r"needs a \[64, 64\] rotation"):
        quantize_mse(torch.zeros(3, 64), torch.eye(32), codec.boundaries)


@pytest.mark.filterwarnings(  # the interpreter's numpy arithmetic on the inf and NaN rows
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
@pytest.mark.parametrize("prod", [False, True])
def test_the_overflow_flag_is_set_exactly_where_a_stored_norm_is_not_finite(prod):
    """A row whose norm fp16 cannot hold (it rounds to inf from 65 520) is stored as inf and a row holding NaN as
    NaN: each sets the flag, and every other row is coded as by the kernel without a flag; in-range rows, and the
    same rows with float32 norms, leave it as it is (0, or 1 from an earlier call: the caller reads it when it
    syncs)."""
    dim, bits = 64, 3
    codec = (TurboQuantProd if prod else TurboQuantMSE)(dim, bits, rotation="fast_hadamard", seed=3)
    mse = codec.mse if prod else codec
    x = torch.randn(2, 33, dim, generator=torch.Generator().manual_seed(0)) * 4  # norms ~32

    def quantize(x, norm_dtype=torch.float16, flag=0):
        overflow = None if flag is None else torch.full((1,), flag, dtype=torch.int32, device=DEVICE)
        arguments = (x.to(DEVICE), mse.rotation.matrix().to(DEVICE), mse.boundaries.to(DEVICE))
        if prod:
            fields = quantize_prod(
                *arguments,
                codec.projection.to(DEVICE),
                mse.centroids.to(DEVICE),
                norm_dtype,
                overflow=overflow,
            )
        else:
            fields = quantize_mse(*arguments, norm_dtype, overflow=overflow)
        return None if overflow is None else int(overflow.item()), [f.cpu() for f in fields]

    norms_at = 2 if prod else 1
    _, plain = quantize(x, flag=None)
    flag, fields = quantize(x)
    assert flag == 0
    for got, want in zip(fields, plain, strict=True):
        assert torch.equal(got, want)
    assert quantize(x, flag=1)[0] == 1
    big, not_finite = x.clone(), x.clone()
    big[1, 7] *= 1e4  # a norm ~3e5
    not_finite[0, 30, 5] = float("nan")
    for rows, row in ((big, (1, 7)), (not_finite, (0, 30))):
        flag, fields = quantize(rows)
        assert flag == 1
        assert not torch.isfinite(fields[norms_at][row])
        others = torch.ones(x.shape[:-1], dtype=torch.bool)
        others[row] = False
        for got, want in zip(fields, plain, strict=True):
            assert torch.equal(got[others], want[others])
    flag, fields = quantize(big, torch.float32)
    assert flag == 0 and fields[norms_at][1, 7] > 65504
    arguments = (x.to(DEVICE), mse.rotation.matrix().to(DEVICE), mse.boundaries.to(DEVICE))
    for wrong in (  # each rule alone: the dtype, one element, x's device
        torch.zeros(1, device=DEVICE),
        torch.zeros(2, dtype=torch.int32, device=DEVICE),
        torch.zeros(1, dtype=torch.int32, device="meta"),
    ):
        with pytest.raises(ValueError, match="expected an int32 tensor of one element on"):
            quantize_mse(*arguments, overflow=wrong)


@pytest.mark.parametrize(  # MSE with the signed halves; centered; Prod; other widths; values with fp32 norms
    "dim, key_bits, value_bits, kind, with_query",
    [
        (256, 4, 4, "mse", True),
        (128, 3, 3, "centered", True),
        (64, 3, 3, "prod", True),
        (64, 4, 2, "mse", True),
        (64, 3, 3, "fp32 norms", False),
    ],
)
def test_keys_and_values_run_together_as_two_calls_would(
    dim, key_bits, value_bits, kind, with_query, monkeypatch
):
    """run_together (a frozen step's keys and values): each side's codes, norms, sketch and overflow flag are
    those of its own call, written at the one device-side count; one launch when the settings agree, else
    two; with the step's queries, their rotation (`rotate_queries`'s) on a third plane of that launch."""
    from tqlab.kernels import quantize
    from tqlab.kernels.step import rotate_queries

    generator = torch.Generator().manual_seed(dim + key_bits + value_bits)
    batch, heads, capacity, first = 2, 2, 7, 4
    at = torch.tensor(first, device=DEVICE)

    def side(bits: int, seed: int):
        codecs = [
            TurboQuantProd(dim, bits, seed=seed + h)
            if kind == "prod"
            else TurboQuantMSE(dim, bits, seed=seed + h)
            for h in range(heads)
        ]
        mse = [c.mse if kind == "prod" else c for c in codecs]
        rotation = torch.stack([c.rotation.matrix() for c in mse]).to(DEVICE)
        x = torch.randn(batch, heads, 1, dim, generator=generator) + 0.3
        if seed == 20:  # one value too long for an fp16 norm: its side's flag alone is set
            x[1, 0] *= 1e5
        x = x.to(DEVICE, torch.bfloat16)
        mean = torch.randn(heads, dim, generator=generator).to(DEVICE) if kind == "centered" else None
        fields = {"indices": (mse[0].bits * dim // 8,), "norms": ()}
        if kind == "prod":
            fields = {
                "indices": (mse[0].bits * dim // 8,),
                "signs": (dim // 8,),
                "norms": (),
                "residual_norms": (),
            }
        stores = [_store([((batch, heads), shape) for shape in fields.values()], capacity) for _ in range(2)]
        norm_dtype = torch.float32 if kind == "fp32 norms" and seed == 20 else torch.float16
        stores = [tuple(t.to(norm_dtype) if t.is_floating_point() else t for t in store) for store in stores]
        overflow = [torch.zeros(1, dtype=torch.int32, device=DEVICE) for _ in range(2)]
        boundaries = mse[0].boundaries.to(DEVICE)

        def call(store, flag, launch):
            if kind == "prod":
                projection = torch.stack([c.projection for c in codecs]).to(DEVICE)
                return quantize_prod(
                    x, rotation, boundaries, projection, mse[0].centroids.to(DEVICE), into=store, at=at,
                    overflow=flag, launch=launch,
                )  # fmt: skip
            return quantize_mse(
                x,
                rotation,
                boundaries,
                norm_dtype,
                mean=mean,
                into=store,
                at=at,
                overflow=flag,
                launch=launch,
            )

        return call, stores, overflow, rotation

    key_call, key_stores, key_flags, key_rotations = side(key_bits, 10)
    value_call, value_stores, value_flags, _ = side(value_bits, 20)
    query = torch.randn(batch, 3 * heads, 1, dim, generator=generator).to(DEVICE, torch.bfloat16)
    step_start = dict(query=query, rotations=key_rotations) if with_query else {}
    grids = []
    launcher = quantize._quantize_rows
    monkeypatch.setattr(quantize, "_quantize_rows", _Spy(launcher, grids))
    key_call(key_stores[0], key_flags[0], True)
    value_call(value_stores[0], value_flags[0], True)
    assert len(grids) == 2
    outputs, rotated = quantize.run_together(
        key_call(key_stores[1], key_flags[1], False),
        value_call(value_stores[1], value_flags[1], False),
        **step_start,
    )
    paired = key_bits == value_bits and kind != "fp32 norms"  # arguments of other types: two launches
    assert len(grids) == (3 if paired else 4) and (len(grids[2]) == 3) == paired
    assert not paired or grids[2][2] == 2 + with_query  # the queries' rotation on a third plane
    assert (rotated is None) != with_query
    if with_query:
        assert torch.equal(rotated, rotate_queries(query, key_rotations))
    for stores, got in ((key_stores, outputs[0]), (value_stores, outputs[1])):
        assert all(g is s for g, s in zip(got, stores[1], strict=True))
        for alone, together in zip(*stores, strict=True):
            assert torch.equal(together, alone)
            marker = 0xA5 if alone.dtype == torch.uint8 else -3.0
            assert (alone[:, :, first] != marker).any() and (alone[:, :, first + 1 :] == marker).all()
    assert [f.item() for f in key_flags + value_flags] == [0, 0] + [int(kind != "fp32 norms")] * 2


class _Spy:
    """`_quantize_rows` recording each launch's grid."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


PAIRED_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tqlab.kernels import quantize

kernel = quantize._quantize_rows
types = {"x": "*bf16", "matrix": "*bf16", "codes": "*u8", "norms": "*fp16", "sketch_signs": "*u8",
         "residual_norms": "*fp16", "at": "*i64", "overflow": "*i32", "inv_sqrt_d": "fp32", "query": "*bf16",
         "q_rotations": "*fp32", "q_rotated": "*fp32"}
fp32 = {"boundaries", "row_signs", "centroids", "sketch_t", "mean", "signed_mean"}
cases = [(128, False, False, False, False), (256, True, False, True, True), (64, False, True, False, True)]
for dim, halves, sketch, centered, start in cases:
    unused = set()
    if not halves:
        unused |= {"row_signs"}
    if not sketch:
        unused |= {"centroids", "sketch_t", "sketch_signs", "residual_norms"}
    if not centered:
        unused |= {"mean", "signed_mean"}
    constants = dict(
        DIM=dim, BITS=4, BLOCK_ROWS=32 if sketch else 64, COLS=128 if dim > 64 else 64, SIGNS=True,
        HALVES=halves, OUT_COLS=32 if sketch else 64, SYMMETRIC=True, PRECISION="tf32x3", F32_DOT=False,
        SKETCH=sketch, PERMUTED=halves, CENTERED=centered, AT=True, OVERFLOW=True, SIGN_MAGNITUDE=not sketch,
        PAIR=True, rows=1,
        START=start, Q_KV_HEADS=2, Q_GROUP=6, Q_ROWS=16, Q_BLOCK=32,
        **{name + suffix: None for name in unused for suffix in ("", "2")},
    )
    base = {n: n.removesuffix("2") for n in kernel.arg_names}
    signature = {
        n: "constexpr" if n in constants else types.get(base[n], "*fp32" if base[n] in fp32 else "i32")
        for n in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
"""


def test_paired_launches_compile_for_a_gpu():
    """The interpreter runs run_together's argument swap and early returns as plain Python; compiled, each
    swapped argument must keep its type. A decode step's shapes compile for sm_90: the signed halves centered
    and Prod with the query's rotation on a third plane, MSE without it."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ):
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PAIRED_COMPILE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("prod", [False, True])
def test_bfloat16_norms_round_to_nearest_as_the_codec_does(prod):
    """Triton's interpreter truncates a bf16 store: every norm would be rounded down on a CPU."""
    x = (torch.randn(500, 64, generator=torch.Generator().manual_seed(0)) * 3).to(DEVICE)
    if prod:
        c = TurboQuantProd(64, 4, rotation="fast_hadamard", norm_dtype=torch.bfloat16).to(DEVICE)
        _, _, norms, residual = quantize_prod(
            x, c.rotation.matrix(), c.mse.boundaries, c.projection, c.mse.centroids, torch.bfloat16
        )
        ref = c.quantize(x)
        assert (residual != ref.residual_norms).float().mean() < 0.05  # fp32 rounding of ‖r‖ apart
    else:
        c = TurboQuantMSE(64, 3, rotation="fast_hadamard", norm_dtype=torch.bfloat16).to(DEVICE)
        _, norms = quantize_mse(x, c.rotation.matrix(), c.boundaries, torch.bfloat16)
        ref = c.quantize(x)
    assert (norms != ref.norms).float().mean() < 0.05  # truncated: about half differed, all below


def test_a_single_vector_and_heads_without_tokens_code_as_the_codec_does():
    c = TurboQuantMSE(64, 3, rotation="fast_hadamard").to(DEVICE)
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    indices, norms = quantize_mse(x, c.rotation.matrix(), c.boundaries)
    ref = c.quantize(x)
    assert torch.equal(indices, ref.indices) and torch.equal(norms, ref.norms)
    rotations = torch.stack([c.rotation.matrix()] * 2)
    indices, norms = quantize_mse(torch.randn(1, 2, 0, 64, device=DEVICE), rotations, c.boundaries)
    assert indices.shape == (1, 2, 0, 24) and norms.shape == (1, 2, 0)
