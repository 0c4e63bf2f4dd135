"""The register-fragment kernel's launch (`decode.register_launch`), which needs no GPU: every key in exactly one
chunk, at most one wave of resident programs, programs of two warps and pair tables only where their rules allow
them, the documented chunk lengths, and the launches the H200 made at commit fd81183 (2026-12-04; read there from
the kernel's grid by a throwaway probe, and the batch-16 ones in docs/benchmarks.md, "Chunk lengths at batch 16
with 2 KV heads")."""

import itertools

import pytest

pytest.importorskip("triton.experimental.gluon")

from tqlab.kernels import decode, decode_mma  # noqa: E402

# H200 under triton 3.6: 132 SMs, 12 one-warp and 8 two-warp programs per SM at the kernel's registers (128 per
# thread), 228 KiB of shared memory
H200 = dict(sms=132, resident=12, two_warp_resident=8, shared_per_sm=233472)
# a GPU whose torch reports no shared memory: no pair tables
SMALL = dict(sms=20, resident=10, two_warp_resident=6, shared_per_sm=0)
TABLES = 4 * 1024 * 1024  # room for any number of pair tables


def launch(batch, kv_heads, tokens, bits, rows, dim=128, device=H200, v_bits=None, **options):
    return decode.register_launch(
        decode_mma, batch, kv_heads, tokens, dim, bits, v_bits or bits, rows, **device, **options
    )


@pytest.mark.parametrize(
    "batch, kv_heads, tokens, bits, rows, static, splits, chunk, lookup, warps",
    [
        (16, 2, 32768, 4, 6, False, 49, 672, False, 1),  # Qwen2.5-Coder-1.5B's heads
        (16, 2, 32768, 3, 6, False, 49, 672, True, 1),
        (16, 2, 65536, 4, 6, False, 49, 1344, True, 1),
        (16, 2, 65536, 3, 6, False, 49, 1344, True, 1),
        (1, 8, 32768, 4, 4, False, 128, 256, False, 1),  # Llama-3's
        (1, 8, 32768, 3, 4, False, 128, 256, False, 1),  # 65 % of a wave: no tables (there were at fd81183)
        (1, 8, 65536, 4, 4, False, 187, 352, False, 1),
        (1, 8, 65536, 3, 4, False, 187, 352, True, 1),
        (16, 8, 65536, 4, 4, False, 12, 5472, True, 1),
        (16, 8, 65536, 3, 4, False, 12, 5472, True, 1),
        (1, 2, 131200, 4, 6, True, 512, 0, False, None),  # a frozen cache's capacity (GraphDecoder); its
        (4, 2, 32896, 4, 6, True, 128, 0, False, None),  # warps were read under another rule
    ],
)
def test_the_launches_the_h200_made(
    batch, kv_heads, tokens, bits, rows, static, splits, chunk, lookup, warps
):
    got = launch(batch, kv_heads, tokens, bits, rows, static_launch=static)
    assert (got.splits, got.chunk, got.lookup_keys) == (splits, chunk, lookup)
    assert warps is None or got.warps == warps


def test_short_chunks_where_they_all_fit_one_wave_else_chunks_of_8_blocks_at_least():
    """docs/benchmarks.md, "Launch shape and merge": at batch 1 with 2 KV heads the H200 holds 792 one-warp programs
    per KV head, so chunks of 4 blocks serve up to 4 × 792 blocks, and one block more takes chunks of 8 or more
    (16 query rows: one warp, which these chunk lengths are for)."""
    last_short, first_long = launch(1, 2, 4 * 792 * 32, 4, 16), launch(1, 2, (4 * 792 + 4) * 32, 4, 16)
    assert (last_short.chunk, last_short.splits, last_short.warps) == (4 * 32, 792, 1)
    assert first_long.chunk >= 8 * 32 and first_long.splits <= 792 and first_long.warps == 1


def test_short_chunks_of_two_warps_go_down_to_two_blocks_while_few():
    """docs/benchmarks.md, "Shorter chunks for two warps": at batch 1 with 2 KV heads, 16k keys take chunks of 2
    blocks on two warps (512 programs, under 4 per SM of 132); 32k stops at 4 per SM, in chunks of 4 blocks."""
    at_16k, at_32k = launch(1, 2, 16384, 4, 6), launch(1, 2, 32768, 4, 6)
    assert (at_16k.chunk, at_16k.splits, at_16k.warps) == (2 * 32, 256, 2)
    assert (at_32k.chunk, at_32k.splits, at_32k.warps) == (4 * 32, 256, 2)
    assert 2 * at_32k.splits <= decode_mma.TWO_WARP_SHORT_PROGRAMS_PER_SM * H200["sms"]


def test_short_chunks_too_many_for_one_wave_of_two_warps_lengthen_rather_than_take_one_warp():
    """docs/benchmarks.md, "Longer chunks of two warps rather than one warp": at batch 1 with 2 KV heads, 96k keys
    in chunks of 4 blocks are 768 programs per KV head, more two-warp programs than the H200 holds (8 per SM); they
    run 4 per SM on two warps instead, in chunks of 12 blocks. 3-bit keys in chunks that long would read pair
    tables, which two-warp programs do not take: chunks of 4 blocks on one warp, as before."""
    k4, k3 = launch(1, 2, 98304, 4, 6), launch(1, 2, 98304, 3, 6)
    assert 2 * 98304 // (4 * 32) > H200["two_warp_resident"] * H200["sms"]
    assert (k4.chunk, k4.splits, k4.warps, k4.lookup_keys) == (12 * 32, 256, 2, False)
    assert 2 * k4.splits <= decode_mma.TWO_WARP_SHORT_PROGRAMS_PER_SM * H200["sms"]
    assert (k3.chunk, k3.splits, k3.warps, k3.lookup_keys) == (4 * 32, 768, 1, False)
    # where it starts (4 query rows; with 6 or more chunks lengthen sooner, next test): 2 × 529 short chunks are
    # two more than one wave; 2 × 528 fit it, on chunks of 5 blocks
    last_wave, first_longer = launch(1, 2, 2115 * 32, 4, 4), launch(1, 2, 2116 * 32, 4, 4)
    assert (last_wave.chunk, last_wave.splits, last_wave.warps) == (5 * 32, 423, 2)
    assert (first_longer.chunk, first_longer.splits, first_longer.warps) == (9 * 32, 236, 2)


def test_at_six_query_rows_or_more_two_warp_chunks_lengthen_even_within_one_wave():
    """docs/benchmarks.md, "Longer two-warp chunks at six query rows or more": at batch 1 with 2 KV heads, 64k keys
    in chunks of 4 blocks are 512 two-warp programs per KV head: one wave holds them (8 per SM), but they are
    more than 4 per SM. With 6 or 8 query rows per KV head they run 4 per SM in chunks of 8 blocks; with 4 or 5
    in chunks of 4 blocks, as do 3-bit keys, for which chunks of 8 blocks are long enough for pair tables (and on two
    warps were slower)."""
    assert 2 * 512 <= H200["two_warp_resident"] * H200["sms"]
    assert 2 * 512 > decode_mma.TWO_WARP_SHORT_PROGRAMS_PER_SM * H200["sms"]
    for bits, rows in itertools.product([2, 4], [6, 8]):
        got = launch(1, 2, 65536, bits, rows)
        assert (got.chunk, got.splits, got.warps, got.lookup_keys) == (8 * 32, 256, 2, False)
    for bits, rows in [(2, 4), (4, 4), (4, 5), (3, 6), (3, 8)]:
        got = launch(1, 2, 65536, bits, rows)
        assert (got.chunk, got.splits, got.warps, got.lookup_keys) == (4 * 32, 512, 2, False)
    # where it starts: 1060 blocks make 265 short chunks per KV head, one more than 4 per SM (264 for 2 heads)
    six_rows, five_rows = launch(1, 2, 1060 * 32, 4, 6), launch(1, 2, 1060 * 32, 4, 5)
    assert (six_rows.chunk, six_rows.splits, six_rows.warps) == (5 * 32, 212, 2)
    assert (five_rows.chunk, five_rows.splits, five_rows.warps) == (4 * 32, 265, 2)


SHAPES = list(
    itertools.product(
        [1, 2, 4, 16],  # sequences
        [1, 2, 8],  # KV heads
        [1, 31, 32, 33, 1000, 4096, 32768, 65543, 131072],  # keys
        [(2, 2), (3, 3), (4, 4), (4, 2), (3, 4)],  # key and value bits
        [4, 6, 8, 16],  # query rows per KV head
        [64, 128, 256],  # head_dim
    )
)


@pytest.mark.parametrize("device", [H200, SMALL], ids=["h200", "small"])
def test_every_key_in_one_chunk_and_one_wave_at_most(device):
    for batch, kv_heads, tokens, (k_bits, v_bits), rows, dim in SHAPES:
        block = decode_mma.block_keys(dim)
        blocks = -(-tokens // block)
        for static in [False, True]:
            got = launch(batch, kv_heads, tokens, k_bits, rows, dim, device, v_bits, static_launch=static)
            assert batch * kv_heads * got.splits <= max(batch * kv_heads, device["resident"] * device["sms"])
            if static:  # the kernel splits each sequence's own keys: at most one chunk per block
                assert got.chunk == 0 and 1 <= got.splits <= blocks, (tokens, got)
            else:  # whole blocks, the last chunk holding the last key, none empty
                assert got.chunk % block == 0, (tokens, got)
                assert (got.splits - 1) * got.chunk < tokens <= got.splits * got.chunk, (tokens, got)


def test_chunks_asked_for_are_whole_blocks_one_per_block_at_most():
    for splits in [1, 7, 64, 512, 1024, 5000]:
        dynamic = launch(1, 2, 32768, 4, 16, num_splits=splits)
        static = launch(1, 2, 32768, 4, 16, num_splits=splits, static_launch=True)
        assert (dynamic.splits, static.splits) == (min(splits, 1024),) * 2
        assert dynamic.chunk == -(-1024 // min(splits, 1024)) * 32 and static.chunk == 0


@pytest.mark.parametrize("two_warps", ["auto", "always"])
@pytest.mark.parametrize(
    "device", [H200, SMALL, {**H200, "shared_per_sm": TABLES}], ids=["h200", "small", "big"]
)
def test_two_warps_and_pair_tables_only_where_their_rules_allow(device, two_warps, monkeypatch):
    monkeypatch.setattr(decode, "TWO_WARPS", two_warps)
    for batch, kv_heads, tokens, (k_bits, v_bits), rows, dim in SHAPES:
        got = launch(batch, kv_heads, tokens, k_bits, rows, dim, device, v_bits)
        blocks = -(-tokens // decode_mma.block_keys(dim))
        if got.warps == 2:  # a shape the two-warp kernel takes (keys and values of one width, d = 128, ≤ 8
            # rows, no pair tables), under "auto" only in one wave of its programs
            assert dim == 128 and k_bits == v_bits and rows <= 8 and not got.lookup_keys
            if two_warps == "auto":
                assert batch * kv_heads * got.splits <= device["two_warp_resident"] * device["sms"]
        # long chunks of 3- or 4-bit keys at d ≥ 128 in a nearly full wave of programs, with tables for every
        # resident program
        if got.lookup_keys:
            assert k_bits >= 3 and dim >= decode_mma.LOOKUP_MIN_DIM
            assert -(-blocks // got.splits) >= decode_mma.LOOKUP_MIN_BLOCKS[k_bits]
            wave = device["resident"] * device["sms"]
            assert batch * kv_heads * got.splits >= decode_mma.LOOKUP_MIN_WAVE * wave
            table = decode_mma.pair_table_bytes(k_bits, v_bits) + decode._RESERVED_SHARED
            assert device["shared_per_sm"] >= device["resident"] * table
    # and taken wherever those allow: chunks of 171 blocks of 4-bit keys, 1536 programs (97 % of a wave)
    assert launch(16, 8, 65536, 4, 4, num_splits=12, device={**H200, "resident": 12}).lookup_keys
    assert not launch(16, 8, 65536, 4, 4, num_splits=14, device={**H200, "resident": 14}).lookup_keys
    assert not launch(16, 8, 65536, 4, 4, num_splits=12, device={**H200, "shared_per_sm": 167936}).lookup_keys
    assert not launch(
        16, 8, 65536, 4, 4, dim=64, num_splits=12, device={**H200, "shared_per_sm": TABLES}
    ).lookup_keys
    assert not launch(16, 8, 65536, 4, 4, num_splits=8).lookup_keys  # 1024 programs: 65 % of a wave


def test_chunks_asked_for_run_on_one_warp_unless_two_are_always_taken(monkeypatch):
    """num_splits from the caller (tools, tests): those chunks, on one warp under "auto"; "always" gives two
    warps wherever the kernel takes the shape."""
    for splits in [1, 7, 64, 512]:
        assert launch(1, 2, 32768, 4, 6, num_splits=splits).warps == 1
    monkeypatch.setattr(decode, "TWO_WARPS", "always")
    assert launch(1, 2, 32768, 4, 6, num_splits=512).warps == 2
    assert launch(1, 2, 32768, 4, 16, num_splits=512).warps == 1  # 16 rows: one warp only
