"""Fused decode attention over packed codes against a float64 reference built from the real codec."""

import pytest
import torch

pytest.importorskip("triton")

from tqlab.kernels import centroid_table, decode_attention  # noqa: E402
from tqlab.kernels.packed import sign_magnitude  # noqa: E402
from tqlab.quant import TurboQuantMSE, unpack_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(
    autouse=True, params=["tiles", "registers", "pair table", "two warps"] if DEVICE == "cuda" else ["tiles"]
)
def kernel(request, monkeypatch):
    """On a GPU every case runs on both kernels: the Triton-language one (also the interpreter's) and the
    register-fragment one (`decode_mma`), which small problems would otherwise not reach, the latter also
    with 3- and 4-bit keys (and 3-bit values) from its shared-memory pair tables at every chunk length, and
    in programs of two warps wherever it takes them (`decode_mma.two_warps`). For the latter the fixture is the
    list of its launches, which the parity tests check is not empty."""
    from tqlab.kernels import decode

    if request.param == "tiles":
        monkeypatch.setattr(decode, "REGISTER_KERNEL_MIN_KEYS", float("inf"))
        return None
    mma = decode._mma_kernel()
    assert mma is not None, "this triton has no Gluon: the register-fragment kernel cannot run"
    monkeypatch.setattr(decode, "REGISTER_KERNEL_MIN_KEYS", 0)
    if request.param == "two warps":
        monkeypatch.setattr(decode, "TWO_WARPS", "always")
    least = 0 if request.param == "pair table" else float("inf")
    monkeypatch.setattr(mma, "LOOKUP_MIN_BLOCKS", dict.fromkeys(mma.LOOKUP_MIN_BLOCKS, least))
    if request.param == "pair table":  # in launches of any size
        monkeypatch.setattr(mma, "LOOKUP_MIN_WAVE", 0)
    launches = record_launches(monkeypatch, mma, "_attend_chunk_mma")
    launches.table = request.param == "pair table"
    launches.two_warps = request.param == "two warps"
    return launches


class Launches(list):
    """Launch grids, and with each launch whether its keys came from a pair table (`lookups`) and its
    constants (`constants`)."""

    table = two_warps = False


def record_launches(monkeypatch, module, name: str) -> Launches:
    """The launch grids of the kernel `module.name`, recorded while it still launches."""
    launches, kernel = Launches(), getattr(module, name)
    launches.lookups, launches.constants = [], []

    class Recorded:
        def __getitem__(self, grid):
            launches.append(grid)

            def launch(*args, **kwargs):
                launches.lookups.append(kwargs.get("LOOKUP_KEYS", False))
                launches.constants.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Recorded())
    return launches


def took_the_expected_path(kernel, k_bits, dim) -> None:
    """With the pair table on, every launch of the register kernel with 3- or 4-bit keys and head_dim >= 128
    used it, and no other; with two warps on, every launch whose shape they take (keys and values of one
    width, head_dim 128, <= 8 rows) had two warps, and no other."""
    if kernel is not None and kernel.table:
        assert kernel.lookups and all(used == (k_bits >= 3 and dim >= 128) for used in kernel.lookups)
    if kernel is not None and kernel.two_warps:
        assert kernel.constants and all(
            (c["WARPS"] == 2) == (c["K_BITS"] == c["V_BITS"] and c["DIM"] == 128 and c["ROWS"] <= 8)
            for c in kernel.constants
        )


def register_kernel_takes(kernel, dim, k_bits, v_bits, rows):
    """Skip a case the register-fragment kernel refuses (the other kernel serves it, tested with "tiles")."""
    if kernel is not None:
        from tqlab.kernels import decode_mma

        if not decode_mma.supports(dim, k_bits, v_bits, rows):
            pytest.skip("the register-fragment kernel does not take this shape")


# The kernel feeds tensor cores fp16 operands (unit roundoff 2^-11: the query, the centroids, p·‖v‖) and
# accumulates in fp32; a few roundoffs of the output's scale bound its error.
TOLERANCE = 8 * 2**-11


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rotated_codes(codec, code):
    """c[idx] · ‖x‖ in float64 from the stored bytes, decoded by the codec's own unpacking."""
    idx = unpack_bits(code.indices, codec.bits, codec.dim)
    return codec.centroids.double()[idx] * code.norms.double().unsqueeze(-1)


def reference(q, keys, values, lengths, scaling, starts=None, shift=0, with_lse=False):
    """softmax(scaling · q kᵀ) v per query head over its KV head's keys starts[b] <= t < lengths[b], causal
    among the step's Tq query tokens (shifted by `shift`), in float64; with its log-sum-exp."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    q_len, tokens = q.shape[2], keys.shape[2]
    starts = torch.zeros_like(lengths) if starts is None else starts
    position = lengths[:, None] - q_len + torch.arange(q_len) + shift  # [B, Tq]
    key = torch.arange(tokens)
    seen = (key <= position[..., None]) & (key < lengths[:, None, None]) & (key >= starts[:, None, None])
    logits = (q.double() @ keys.transpose(-1, -2) * scaling).masked_fill(~seen[:, None], float("-inf"))
    out = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ values
    return (out, torch.logsumexp(logits, dim=-1)) if with_lse else out


def stored(codec, code):
    """The indices and table as the cache stores them: 4-bit codes as sign-magnitude labels (the register
    kernel's shorter decode; Lloyd-Max codebooks are symmetric), the others as the codec's indices."""
    labels = codec.bits == 4
    indices = sign_magnitude(code.indices) if labels else code.indices
    return indices.to(DEVICE), centroid_table(codec.centroids.to(DEVICE), labels)


def run(q, k_codec, k_code, v_codec, v_code, lengths, scaling, num_splits, with_lse=False, **kw):
    (k_indices, k_table), (v_indices, v_table) = stored(k_codec, k_code), stored(v_codec, v_code)
    out, lse = decode_attention(
        q.to(DEVICE), k_indices, k_code.norms.to(DEVICE), v_indices, v_code.norms.to(DEVICE), k_table, v_table,
        lengths.to(DEVICE), scaling, num_splits, **kw,
    )  # fmt: skip
    assert out.dtype == torch.float32 and lse.shape == out.shape[:-1]
    return (out.cpu().double(), lse.cpu().double()) if with_lse else out.cpu().double()


CASES = [  # dim, key bits, value bits, query heads per KV head, query tokens, lengths (T = max), splits
    (64, 2, 2, 1, 1, [33], None),
    (64, 3, 4, 4, 1, [150, 77], 3),
    (64, 4, 4, 8, 4, [40, 100], 5),
    (64, 4, 3, 2, 1, [70, 33], 2),  # 3-bit values where a lane's group crosses a word (or not)
    (128, 3, 3, 2, 1, [200, 1, 129], 4),
    (128, 4, 4, 8, 1, [97], 2),
    (128, 4, 2, 4, 3, [70, 64], 2),
    (128, 2, 3, 1, 2, [65], 1),
    (128, 2, 2, 4, 1, [300, 129], 2),  # the 2-bit pair lookup over several blocks
    (32, 2, 4, 2, 1, [40], None),  # the pair lookup where a row holds 4 groups, and at d = 256 (32)
    (256, 2, 2, 4, 2, [150], 2),
    (128, 4, 2, 2, 3, [256, 200], 2),  # a whole last block that the causal cut still masks
    (256, 3, 3, 4, 1, [130, 65], 2),
    (256, 4, 3, 2, 2, [90], None),
    pytest.param(  # default split count over many chunks (too slow for the interpreter)
        128, 4, 3, 4, 1, [5000, 3001], None, marks=pytest.mark.skipif(DEVICE == "cpu", reason="GPU only")
    ),
]


@pytest.mark.parametrize("dim,k_bits,v_bits,group,q_len,lengths,splits", CASES)
def test_matches_float64_attention_over_the_decoded_codes(
    dim, k_bits, v_bits, group, q_len, lengths, splits, kernel
):
    register_kernel_takes(kernel, dim, k_bits, v_bits, group * q_len)
    seed = dim + 10 * k_bits + v_bits + group
    batch, kv_heads, tokens = len(lengths), 2, max(lengths)
    k_codec = TurboQuantMSE(dim, k_bits, rotation="fast_hadamard", seed=seed)
    v_codec = TurboQuantMSE(dim, v_bits, rotation="fast_hadamard", seed=seed + 1)
    k_code = k_codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=seed) * 2)
    v_code = v_codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=seed + 1) * 3)
    q = gaussian(batch, kv_heads * group, q_len, dim, seed=seed + 2) * 2  # already rotated
    lengths = torch.tensor(lengths)
    scaling = dim**-0.5
    out = run(q, k_codec, k_code, v_codec, v_code, lengths, scaling, splits)
    expected = reference(q, rotated_codes(k_codec, k_code), rotated_codes(v_codec, v_code), lengths, scaling)
    scale = expected.abs().max()
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * scale)
    assert kernel is None or kernel  # the register-fragment kernel ran
    took_the_expected_path(kernel, k_bits, dim)


@pytest.mark.parametrize("shift", [0.05, 0.0])
def test_codes_not_in_sign_magnitude_order_take_the_general_4_bit_decode(shift, kernel):
    """The register-fragment kernel decodes 4-bit sign-magnitude labels of a symmetric codebook by magnitude
    and sign; an asymmetric codebook, or a symmetric one indexed by the codec's own indices, must take its
    general decode and still be exact."""
    dim, batch, kv_heads, group, tokens = 128, 2, 2, 4, 200
    codec = TurboQuantMSE(dim, 4, rotation="fast_hadamard", seed=3)
    shifted = codec.centroids + shift  # 0.05: no longer c[15 - i] = -c[i]
    k_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=4))
    v_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=5))
    q = gaussian(batch, kv_heads * group, 1, dim, seed=6) * 2
    lengths, scaling = torch.tensor([200, 77]), dim**-0.5
    table = centroid_table(shifted.to(DEVICE))
    out, _ = decode_attention(
        q.to(DEVICE), k_code.indices.to(DEVICE), k_code.norms.to(DEVICE), v_code.indices.to(DEVICE),
        v_code.norms.to(DEVICE), table, table, lengths.to(DEVICE), scaling,
    )  # fmt: skip
    decoded = [
        shifted.double()[unpack_bits(c.indices, 4, dim)] * c.norms.double().unsqueeze(-1)
        for c in (k_code, v_code)
    ]
    expected = reference(q, *decoded, lengths, scaling)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    assert kernel is None or kernel
    took_the_expected_path(kernel, 4, dim)  # the table holds any codebook's pairs


@pytest.mark.parametrize(
    "dim,group,q_len,shift,bits,splits",  # one chunk per sequence: its rows are the output, with no merge
    [
        (64, 4, 1, 0, 3, 3),
        (64, 2, 3, 2, 3, 1),
        (128, 4, 2, 5, 3, 3),
        (128, 2, 3, 0, 2, 3),
        (64, 4, 2, 1, 4, 1),
        (128, 6, 1, 3, 4, 2),  # K4V4 at d = 128: two-warp programs on a GPU
    ],
)
def test_padding_starts_a_causal_shift_and_the_log_sum_exp(dim, group, q_len, shift, bits, splits, kernel):
    """Left padding (keys before starts[b] unseen) and queries that follow the codes by `shift` exact
    tokens, with the log-sum-exp that merges this attention with attention over those exact tokens."""
    register_kernel_takes(kernel, dim, bits, bits, group * q_len)
    batch, kv_heads, tokens = 3, 2, 140
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=dim)
    k_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=1) * 2)
    v_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=2))
    q = gaussian(batch, kv_heads * group, q_len, dim, seed=3) * 2
    lengths, starts = torch.tensor([140, 90, 7]), torch.tensor([0, 30, 7])  # the last row sees nothing
    scaling = dim**-0.5
    out, lse = run(
        q, codec, k_code, codec, v_code, lengths, scaling, splits, True, starts=starts, causal_shift=shift
    )
    keys, values = rotated_codes(codec, k_code), rotated_codes(codec, v_code)
    expected, expected_lse = reference(q, keys, values, lengths, scaling, starts, shift, with_lse=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    seen = expected_lse.isfinite()
    assert not seen[2].any() and torch.equal(lse.isfinite(), seen) and (out[2] == 0).all()
    # scores carry the fp16 operands' relative roundoff, and so does their log-sum-exp
    torch.testing.assert_close(lse[seen], expected_lse[seen], rtol=TOLERANCE, atol=0)
    assert kernel is None or kernel
    took_the_expected_path(kernel, bits, dim)


@pytest.mark.parametrize(
    "dim,group,q_len,bits,splits", [(64, 4, 1, 4, 3), (128, 2, 2, 3, 1), (128, 6, 1, 4, 2)]
)
def test_means_add_to_every_score_and_to_the_output(dim, group, q_len, bits, splits, kernel):
    """Codes of x − μ (`Centered`) with key_mean / value_mean (Πμ): attention over the codes plus the means,
    with padding (a row that sees no key keeps 0 and −inf) and the log-sum-exp, merged over chunks or not."""
    register_kernel_takes(kernel, dim, bits, bits, group * q_len)
    batch, kv_heads, tokens = 3, 2, 140
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=dim)
    k_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=1))
    v_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=2))
    key_mean, value_mean = gaussian(2, kv_heads, dim, seed=3) * 4  # far from 0, as a key bias puts them
    q = gaussian(batch, kv_heads * group, q_len, dim, seed=4)
    lengths, starts = torch.tensor([140, 90, 7]), torch.tensor([0, 30, 7])
    scaling = dim**-0.5
    out, lse = run(
        q, codec, k_code, codec, v_code, lengths, scaling, splits, True, starts=starts,
        key_mean=key_mean.to(DEVICE), value_mean=value_mean.to(DEVICE),
    )  # fmt: skip
    keys = rotated_codes(codec, k_code) + key_mean.double()[None, :, None]
    values = rotated_codes(codec, v_code) + value_mean.double()[None, :, None]
    expected, expected_lse = reference(q, keys, values, lengths, scaling, starts, with_lse=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    seen = expected_lse.isfinite()
    assert not seen[2].any() and torch.equal(lse.isfinite(), seen) and (out[2] == 0).all()
    torch.testing.assert_close(lse[seen], expected_lse[seen], rtol=TOLERANCE, atol=0)
    assert kernel is None or kernel
    took_the_expected_path(kernel, bits, dim)
    with pytest.raises(ValueError, match=r"key_mean must be a contiguous fp32 \[2, "):
        run(q, codec, k_code, codec, v_code, lengths, scaling, splits, key_mean=key_mean[:1].to(DEVICE))


@pytest.mark.parametrize("dim,bits,splits", [(64, 4, 3), (128, 3, 8), (128, 2, None), (128, 4, 3)])
def test_a_static_launch_splits_each_sequence_by_its_own_length(dim, bits, splits, kernel, monkeypatch):
    """static_launch (what a CUDA graph replays): the launch is sized from the capacity T, the chunks from
    each sequence's length on the device; sequences far shorter than T, padded or empty, stay exact, and
    other lengths launch the same grid."""
    from tqlab.kernels import decode

    register_kernel_takes(kernel, dim, bits, bits, 4)
    grids = kernel if kernel is not None else record_launches(monkeypatch, decode, "_attend_chunk")
    batch, kv_heads, group, tokens = 4, 2, 4, 400
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=dim + bits)
    k_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=11) * 2)
    v_code = codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=12))
    q = gaussian(batch, kv_heads * group, 1, dim, seed=13) * 2
    lengths, starts = torch.tensor([400, 37, 161, 0]), torch.tensor([0, 5, 100, 0])
    scaling = dim**-0.5
    out, lse = run(
        q, codec, k_code, codec, v_code, lengths, scaling, splits, True, starts=starts, static_launch=True
    )
    keys, values = rotated_codes(codec, k_code), rotated_codes(codec, v_code)
    expected, expected_lse = reference(q, keys, values, lengths, scaling, starts, with_lse=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    seen = expected_lse.isfinite()
    assert not seen[3].any() and torch.equal(lse.isfinite(), seen)
    torch.testing.assert_close(lse[seen], expected_lse[seen], rtol=TOLERANCE, atol=0)
    for shorter in (lengths // 3, lengths // 2):
        out = run(
            q, codec, k_code, codec, v_code, shorter, scaling, splits, starts=starts, static_launch=True
        )
        expected = reference(q, keys, values, shorter, scaling, starts)
        torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    # the register kernel's first call launches at a default residency, later ones at the measured one
    assert len(grids) >= 3 and grids[-1] == grids[-2]


def test_one_inverse_rotation_gives_attention_over_dequantized_keys_and_values():
    dim, batch, kv_heads, group, tokens = 128, 2, 2, 4, 90
    k_codec = TurboQuantMSE(dim, 3, rotation="random_haar", seed=5)
    v_codec = TurboQuantMSE(dim, 4, rotation="random_haar", seed=6)
    k_code = k_codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=1))
    v_code = v_codec.quantize(gaussian(batch, kv_heads, tokens, dim, seed=2))
    q = gaussian(batch, kv_heads * group, 1, dim, seed=3) * 2
    lengths, scaling = torch.tensor([90, 41]), dim**-0.5
    # Keys and values share no rotation here, so the query takes the key rotation and the output the value one.
    out = run(k_codec.rotation.apply(q), k_codec, k_code, v_codec, v_code, lengths, scaling, 2)
    out = v_codec.rotation.inverse(out.float()).double()
    keys, values = k_codec.dequantize(k_code).double(), v_codec.dequantize(v_code).double()
    expected = reference(q, keys, values, lengths, scaling)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * expected.abs().max())


def test_split_count_changes_only_rounding():
    dim, tokens = 64, 300
    codec = TurboQuantMSE(dim, 4, rotation="fast_hadamard")
    k_code = codec.quantize(gaussian(1, 1, tokens, dim, seed=7))
    v_code = codec.quantize(gaussian(1, 1, tokens, dim, seed=8))
    q, lengths = gaussian(1, 4, 1, dim, seed=9), torch.tensor([tokens])
    outs = [run(q, codec, k_code, codec, v_code, lengths, 0.125, splits) for splits in (1, 2, 5)]
    # Each chunk rounds p · ‖v‖ to fp16 against its own running maximum, so chunkings differ by roundoff.
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=TOLERANCE * outs[0].abs().max())


def test_codes_of_the_wrong_width_are_refused():
    codec = TurboQuantMSE(64, 3)
    code = codec.quantize(gaussian(1, 1, 8, 64, seed=0))
    q = torch.zeros(1, 1, 1, 128)  # head_dim 128 against 64-dim codes
    table = centroid_table(codec.centroids)
    with pytest.raises(ValueError, match="rows of 24 bytes do not hold 128 codes"):
        decode_attention(
            q, code.indices, code.norms, code.indices, code.norms, table, table, torch.tensor([8]), 1.0
        )


def test_lengths_and_starts_not_one_per_sequence_are_refused():
    """The kernels index them by sequence: a shorter tensor would be read past its end."""
    codec = TurboQuantMSE(64, 2)
    code = codec.quantize(gaussian(2, 1, 8, 64, seed=0))
    q, table = torch.zeros(2, 1, 1, 64), centroid_table(codec.centroids)
    args = (q, code.indices, code.norms, code.indices, code.norms, table, table)
    for lengths, starts, match in [
        (torch.tensor([8]), None, r"lengths must be an integer tensor of shape \(2,\)"),
        (torch.tensor([8.0, 8.0]), None, "lengths must be an integer tensor"),
        (torch.tensor([8, 8]), torch.tensor([[0, 0]]), r"starts must be an integer tensor of shape \(2,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            decode_attention(*args, lengths, 1.0, starts=starts)


def test_more_query_rows_than_the_kernel_holds_are_refused():
    codec = TurboQuantMSE(64, 2)
    code = codec.quantize(gaussian(1, 1, 8, 64, seed=0))
    q = torch.zeros(1, 8, 5, 64)  # 8 query heads on one KV head × 5 query tokens = 40 rows
    table = centroid_table(codec.centroids)
    with pytest.raises(ValueError, match="40 rows exceed the kernel's 32"):
        decode_attention(
            q, code.indices, code.norms, code.indices, code.norms, table, table, torch.tensor([8]), 1.0
        )


@pytest.mark.parametrize("per_sm", [233472, 167936])
def test_programs_holding_a_pair_table_follow_the_shared_memory(per_sm, monkeypatch):
    """A kernel that holds a 16 KiB table counts as many programs per SM as fit both its registers and its
    tables (with CUDA's 1 KiB per block: 13 in an H100/H200 SM's 228 KiB, 9 in an A100's 164 KiB); the shared
    memory is read from torch (whether the table is used at all: test_decode_launch), 0 where it is not
    reported."""
    from tqlab.kernels import decode

    props = type(
        "Properties", (), {"shared_memory_per_multiprocessor": per_sm, "regs_per_multiprocessor": 65536}
    )()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert decode._resident_programs(0, 167, 12, shared=16384) == (12 if per_sm > 200000 else 9)
    assert decode._resident_programs(0, 96, 12, shared=16384) == (13 if per_sm > 200000 else 9)
    decode._shared_per_sm.cache_clear()
    try:
        assert decode._shared_per_sm(0) == per_sm
        decode._shared_per_sm.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: object())
        assert decode._shared_per_sm(0) == 0
    finally:
        decode._shared_per_sm.cache_clear()


@pytest.mark.parametrize(
    "registers,resident", [(255, 8), (167, 12), (168, 12), (169, 8), (128, 16), (104, 16), (96, 20), (40, 32)]
)
def test_one_warp_programs_per_sm_follow_the_register_file(registers, resident, monkeypatch):
    """The CUDA occupancy rules for 65 536 registers: each of 4 sub-partitions holds 16 384, a warp takes
    registers in units of 256 (8 per thread), an SM holds at most 32 blocks."""
    from tqlab.kernels import decode

    props = type("Properties", (), {"regs_per_multiprocessor": 65536})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert decode._resident_programs(0, registers, default=12) == resident
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: object())
    assert decode._resident_programs(0, registers, default=12) == 12  # torch without the field


def test_lengths_outside_the_codes_are_refused_where_they_are_on_the_host():
    """Checked for free on the host (on the device the kernels read them, and the cache keeps them in range)."""
    codec = TurboQuantMSE(64, 2, rotation="fast_hadamard")
    code = codec.quantize(gaussian(2, 1, 20, 64, seed=1))
    q, table = gaussian(2, 2, 1, 64, seed=3), centroid_table(codec.centroids)
    for lengths in (torch.tensor([21, 20]), torch.tensor([-1, 20])):
        with pytest.raises(
            ValueError, match=r"lengths \[-?\d+, 20\] must lie in 0..20, the tokens the codes hold"
        ):
            decode_attention(
                q, code.indices, code.norms, code.indices, code.norms, table, table, lengths, 0.125
            )


def test_no_tokens_or_no_sequences_give_empty_attention():
    """A cache with no codes yet: every query sees no key (0 and −inf); a batch of no sequences: empty."""
    codec = TurboQuantMSE(64, 2)
    table = centroid_table(codec.centroids.to(DEVICE))
    for batch, tokens in [(2, 0), (0, 5)]:
        code = codec.quantize(gaussian(batch, 1, tokens, 64, seed=0))
        indices, norms = code.indices.to(DEVICE), code.norms.to(DEVICE)
        q = gaussian(batch, 4, 1, 64, seed=1).to(DEVICE)
        out, lse = decode_attention(
            q, indices, norms, indices, norms, table, table, torch.zeros(batch, dtype=torch.long), 0.125
        )
        assert out.shape == (batch, 4, 1, 64) and lse.shape == (batch, 4, 1)
        assert (out == 0).all() and (lse == float("-inf")).all()


def test_hostile_arguments_are_refused_with_their_name():
    codec = TurboQuantMSE(64, 2)
    code = codec.quantize(gaussian(2, 1, 8, 64, seed=0))
    q, table, lengths = torch.zeros(2, 2, 1, 64), centroid_table(codec.centroids), torch.tensor([8, 8])
    good = dict(
        query=q, key_indices=code.indices, key_norms=code.norms, value_indices=code.indices,
        value_norms=code.norms, key_table=table, value_table=table, lengths=lengths, scaling=0.125,
    )  # fmt: skip
    for change, error, match in [
        (dict(lengths=torch.tensor([True, True])), ValueError, "lengths must be an integer tensor"),
        (dict(value_norms=code.norms.int()), ValueError, "value_norms must be float16, bfloat16 or float32"),
        (
            dict(key_table=torch.stack([table, table], 1)[:, 0]),
            ValueError,
            "key_table must be centroid_table",
        ),
        (dict(query=q[:, :, 0]), ValueError, r"query must be a floating \[B, Hq, Tq, d\] tensor"),
        (dict(query=q.int()), ValueError, r"query must be a floating"),
        (dict(scaling=torch.tensor(0.125)), TypeError, "scaling must be a Python number"),
        (
            dict(key_indices=code.indices[:, :0], key_norms=code.norms[:, :0]),
            ValueError,
            "at least one KV head",
        ),
    ]:
        with pytest.raises(error, match=match):
            decode_attention(**{**good, **change})
