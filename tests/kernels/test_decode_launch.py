"""The register-fragment kernel's launch (`decode.register_launch`), which needs no GPU: every key in exactly one
chunk, at most one wave of resident programs, programs of two warps and pair tables only where their rules allow
them, and the launches the H200 made (read from the kernel's grid there, 2026-12-04, at commit fd81183)."""

import itertools

import pytest

pytest.importorskip("triton.experimental.gluon")

from tqlab.kernels import decode, decode_mma  # noqa: E402

# H200: 132 SMs, 12 one-warp and 8 two-warp programs per SM at the kernel's registers, 228 KiB of shared memory
H200 = dict(sms=132, resident=12, two_warp_resident=8, shared_per_sm=233472)
SMALL = dict(
    sms=20, resident=10, two_warp_resident=6, shared_per_sm=0
)  # no shared memory reported: no tables


def launch(batch, kv_heads, tokens, bits, rows, dim=128, device=H200, **options):
    return decode.register_launch(
        decode_mma, batch, kv_heads, tokens, dim, bits, bits, rows, **device, **options
    )


@pytest.mark.parametrize(
    "batch, kv_heads, tokens, bits, rows, static, splits, chunk, lookup",
    [
        (16, 2, 32768, 4, 6, False, 49, 672, False),  # Qwen2.5-Coder-1.5B's heads
        (16, 2, 32768, 3, 6, False, 49, 672, True),
        (16, 2, 65536, 4, 6, False, 49, 1344, True),
        (16, 2, 65536, 3, 6, False, 49, 1344, True),
        (1, 8, 32768, 4, 4, False, 128, 256, False),  # Llama-3's
        (1, 8, 32768, 3, 4, False, 128, 256, True),
        (1, 8, 65536, 4, 4, False, 187, 352, False),
        (1, 8, 65536, 3, 4, False, 187, 352, True),
        (16, 8, 65536, 4, 4, False, 12, 5472, True),
        (16, 8, 65536, 3, 4, False, 12, 5472, True),
        (1, 2, 131200, 4, 6, True, 512, 0, False),  # a frozen cache's capacity (GraphDecoder)
        (4, 2, 32896, 4, 6, True, 128, 0, False),
    ],
)
def test_the_launches_the_h200_made(batch, kv_heads, tokens, bits, rows, static, splits, chunk, lookup):
    got = launch(batch, kv_heads, tokens, bits, rows, static_launch=static)
    assert (got.splits, got.chunk, got.lookup_keys) == (splits, chunk, lookup)


SHAPES = list(
    itertools.product(
        [1, 2, 4, 16],  # sequences
        [1, 2, 8],  # KV heads
        [1, 31, 32, 33, 1000, 4096, 32768, 65543, 131072],  # keys
        [2, 3, 4],  # bits
        [4, 6, 8, 16],  # query rows per KV head
        [64, 128, 256],  # head_dim
    )
)


@pytest.mark.parametrize("device", [H200, SMALL], ids=["h200", "small"])
@pytest.mark.parametrize("static", [False, True], ids=["lengths", "static"])
def test_every_key_in_one_chunk_and_one_wave_at_most(device, static):
    for batch, kv_heads, tokens, bits, rows, dim in SHAPES:
        got = launch(batch, kv_heads, tokens, bits, rows, dim, device, static_launch=static)
        block = decode_mma.block_keys(dim)
        blocks = -(-tokens // block)
        programs = batch * kv_heads * got.splits
        assert programs <= max(batch * kv_heads, device["resident"] * device["sms"]), (tokens, got)
        if static:  # the kernel splits each sequence's own length L: chunks of cdiv(L, splits · block) blocks
            assert got.chunk == 0 and 1 <= got.splits <= blocks
            lengths = {0, 1, tokens // 2, tokens - 1, tokens}
            chunks = {length: -(-length // (got.splits * block)) * block for length in lengths}
        else:
            assert got.chunk % block == 0
            chunks = {tokens: got.chunk}
        for length, chunk in chunks.items():  # program by program: the keys each reads follow the last's
            read = 0
            for split in range(got.splits):
                start, stop = split * chunk, min(split * chunk + chunk, length)
                if stop > start:
                    assert start == read, (length, split, got)
                    read = stop
            assert read == length, (tokens, length, got)
        if not static:  # and no program without keys
            assert (got.splits - 1) * got.chunk < tokens


@pytest.mark.parametrize("device", [H200, SMALL], ids=["h200", "small"])
def test_two_warps_and_pair_tables_only_where_their_rules_allow(device):
    for batch, kv_heads, tokens, bits, rows, dim in SHAPES:
        got = launch(batch, kv_heads, tokens, bits, rows, dim, device)
        if got.warps == 2:  # a shape the two-warp kernel takes, in one wave of its programs
            assert decode_mma.two_warps(dim, bits, bits, rows, got.lookup_keys)
            assert batch * kv_heads * got.splits <= device["two_warp_resident"] * device["sms"]
        if got.lookup_keys:  # long chunks of 3- or 4-bit keys, with shared memory for every resident program
            blocks = -(-tokens // decode_mma.block_keys(dim))
            assert bits >= 3 and -(-blocks // got.splits) >= decode_mma.LOOKUP_MIN_BLOCKS[bits]
            assert device["shared_per_sm"] >= device["resident"] * decode_mma.pair_table_bytes(bits, bits)


def test_chunks_asked_for_run_on_one_warp_unless_two_are_always_taken(monkeypatch):
    """num_splits from the caller (tools, tests): those chunks, on one warp under "auto"; "always" gives two
    warps wherever the kernel takes the shape."""
    for splits in [1, 7, 64, 512]:
        got = launch(1, 2, 32768, 4, 6, num_splits=splits)
        assert (got.splits, got.warps) == (splits, 1)
    monkeypatch.setattr(decode, "TWO_WARPS", "always")
    assert launch(1, 2, 32768, 4, 6, num_splits=512).warps == 2
    assert launch(1, 2, 32768, 4, 16, num_splits=512).warps == 1  # 16 rows: one warp only


def test_short_chunks_of_two_warps_go_down_to_two_blocks_while_few():
    """docs/benchmarks.md, "Shorter chunks for two warps": at batch 1 with 2 KV heads, 16k keys take chunks of 2
    blocks on two warps (512 programs, under 4 per SM of 132); 32k stops at 4 per SM, in chunks of 4 blocks."""
    at_16k, at_32k = launch(1, 2, 16384, 4, 6), launch(1, 2, 32768, 4, 6)
    assert (at_16k.chunk, at_16k.splits, at_16k.warps) == (2 * 32, 256, 2)
    assert (at_32k.chunk, at_32k.splits, at_32k.warps) == (4 * 32, 256, 2)
    assert 2 * at_32k.splits <= decode_mma.TWO_WARP_SHORT_PROGRAMS_PER_SM * H200["sms"]
