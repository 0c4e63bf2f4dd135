"""Decode attention with the codes decoded straight into tensor-core operand registers (NVIDIA GPUs, Gluon).

The Triton-language kernel (`decode._attend_chunk`) decodes a block of codes into an fp16 tile and hands it
to `tl.dot`, which stages the tile through shared memory into the layout the tensor cores read; Nsight
Compute showed that round trip (with the codebook shuffles) keeping the L1/shared-memory pipe 71–84 % busy
while HBM idled. Here each lane loads exactly the code words whose centroids make up its own `mma.sync`
operand fragments, decodes them with byte permutes (`prmt`) on the integer ALUs, and feeds the registers to
the tensor cores: no shared memory and no codebook shuffles in the main loop (the only shuffles are the
softmax's reductions over keys and P's move from the score accumulator into the B operand of P·V).

That works because scores and outputs are sums over coordinates in the rotated domain: any fixed order of
the coordinates may be used on both sides of a product. Keys are the A operand of Sᵀ = K·Qᵀ (keys on the MMA's
M axis, the GQA group's query rows on N, so a group of ≤ 8 rows wastes nothing); lane (g, c) of the warp holds
DIM/4 coordinates of each of its keys, chosen to be its own contiguous DIM/4 stored coordinates (one 16-byte
load at 4 bits, d = 128), and the query is loaded in the matching order. Values are the A operand of
Oᵀ = Vᵀ·Pᵀ (coordinates on M, keys on K); lane g holds DIM/8 contiguous stored coordinates of its keys, and
the output is written back through the same order. Within a group of 8 codes, the byte-permute decode emits
the codes in an order of its own (`packed.CODE_ORDER_*`), which the coordinate order absorbs. 4-bit codes
stored as sign-magnitude labels of a codebook symmetric about 0 (`packed.sign_magnitude`, as the cache stores
them; the table's symmetry is checked in the kernel) take the shorter decode
`packed.DECODE4_SIGN_MAGNITUDE_ASM`; others run a second copy of the loop with the general one. Where each program
runs long enough (LOOKUP_MIN_BLOCKS) and a launch nearly fills a wave of programs (LOOKUP_MIN_WAVE), 3- and 4-bit
keys (and at K3V3 the values) are instead looked up two codes at a time in a table of the codebook's 64 or 256
centroid pairs that each program builds in shared memory (`_pair_table`): one shared-memory read and one or two
integer instructions per two codes, which moves part of the decode off the integer pipe that bounds the loop.

One warp per program, each program one chunk of one (sequence, KV head) — split-K as in `decode`, merged by
the same `_merge_chunks`; codes for the next block are loaded into registers while this block computes. Where
short chunks leave SMs half empty (batch 1, few KV heads) programs at head_dim 128 whose keys and values have
one width have two warps that split each block between them (`_attend_blocks_two_warps`).
Gluon does not run in Triton's interpreter, so on a CPU `decode.decode_attention` uses the Triton-language
kernel; this one is checked against the same float64 reference on a GPU, and compiled for sm_90 by the CPU
tests (the conversions of the decoded K and V into operands asserted free of data movement).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .packed import (
    CODE_ORDER_2,
    CODE_ORDER_3,
    CODE_ORDER_4,
    DECODE2_ASM,
    DECODE3_ASM,
    DECODE4_SIGN_MAGNITUDE_ASM,
    PERMUTE4_ASM,
)

# 3- and 4-bit keys (with 3-bit keys, 3-bit values too), where chunks are long (LOOKUP_MIN_BLOCKS[bits] or more blocks
# per program), are decoded by reading each pair of codes' centroids from a table of all 2^(2·bits) fp16 pairs in
# shared memory (`_pair_table`): a read and one or two integer instructions per two codes instead of three to five,
# the shared-memory pipe taking part of the integer pipe's load. Building the table costs each program more than
# short chunks save; 3-bit codes, whose register decode costs more, gain from shorter chunks (measured at K3V3 and
# K4V4, docs/benchmarks.md); 4-bit values from the table were slower, its reads two bank wavefronts each.
LOOKUP_MIN_BLOCKS = {3: 8, 4: 32}
# Tables only where a launch fills most of a wave of resident one-warp programs: with fewer warps per SM nothing
# hides a table read's latency in front of the tensor-core product. Measured on the H200 (docs/benchmarks.md, "Pair
# tables in a nearly full wave"): with 65 % of a wave 3-bit tables were 0.92x (batch 1, 2 KV heads, 128k) and
# 0.99x (8 KV heads, 32k) as fast as none, from 94 % 1.04-1.36x but 0.97x at batch 16, 2 KV heads, 16k (4 bits:
# 1.09-1.13x); 4-bit ones lost with 25-32 %.
LOOKUP_MIN_WAVE = 0.9
# At head_dim 64 the kernel takes fewer registers and an SM holds more programs than their tables would fit.
LOOKUP_MIN_DIM = 128
_BARRIER = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed after triton 3.6
# Copies of each table entry side by side, lane l reading copy l % copies: at 4 bits 16 (16 KiB; lanes l and l + 16
# share one, so at most two reads meet in a bank), at 3 bits 32 (8 KiB, no two reads in one bank).
PAIR_COPIES = {3: 32, 4: 16}


def pair_table_bytes(k_bits: int, v_bits: int) -> int:
    """Shared memory the pair tables take: the keys' codebook, and at K3V3 the values' too (`_pair_table`)."""
    return (1 << 2 * k_bits) * PAIR_COPIES[k_bits] * 4 * (2 if k_bits == v_bits == 3 else 1)


def _lookup_asm(bits: int) -> str:
    """Inline PTX: the 8 codes of a group ($8; 4 bits: one int32, 3 bits: 24 bits) as fp16 centroids in order,
    each pair of codes (a byte; six bits) one shared-memory read of the pair table at the lane's base ($9)."""
    stride = 4 * PAIR_COPIES[bits]
    lines = []
    for k in range(4):
        if bits == 4:  # byte k, zero-extended
            field = f"prmt.b32 e, $8, 0, 0x444{k};"
        else:  # bits 6k .. 6k + 5 (a group has 24)
            field = (
                "and.b32 e, $8, 63;"
                if k == 0
                else f"shr.b32 e, $8, {6 * k};" + (" and.b32 e, e, 63;" if k < 3 else "")
            )
        lines.append(
            f" {field} mad.lo.u32 a, e, {stride}, $9; ld.shared.b32 r, [a]; mov.b32 {{${2 * k}, ${2 * k + 1}}}, r;"
        )
    return "{ .reg .b32 e, a, r;" + "".join(lines) + " }"


def _base_asm(bits: int) -> str:
    """Inline PTX: the shared-memory address of entry 0 of this lane's copy of the pair table."""
    return (
        f"{{ .reg .b32 l, b; mov.u32 l, %laneid; and.b32 l, l, {PAIR_COPIES[bits] - 1}; mov.u32 b, global_smem; "
        "mad.lo.u32 $0, l, 4, b; }"
    )


LOOKUP3_ASM, LOOKUP4_ASM = gl.constexpr(_lookup_asm(3)), gl.constexpr(_lookup_asm(4))
BASE3_ASM, BASE4_ASM = gl.constexpr(_base_asm(3)), gl.constexpr(_base_asm(4))
_COPIES3, _COPIES4 = gl.constexpr(PAIR_COPIES[3]), gl.constexpr(PAIR_COPIES[4])
_TABLE3_BYTES = gl.constexpr(pair_table_bytes(3, 4))  # one 3-bit codebook's table
PROGRAMS_PER_SM = 12  # one-warp programs per SM until the compiled kernel's registers say (decode._RESIDENT)
# Blocks per chunk: SHORT_BLOCKS_PER_SPLIT where chunks that short all fit in one wave of resident programs,
# else at least MIN_BLOCKS_PER_SPLIT (shorter chunks spend more on the prologue and the merge than they save;
# tools/research/gpu_decode_breakdown.py, docs/benchmarks.md "Launch shape and merge").
MIN_BLOCKS_PER_SPLIT = 8
SHORT_BLOCKS_PER_SPLIT = 4
LAUNCH = dict(num_warps=1)  # one warp per program, unless `two_warps` says otherwise (WARPS=2, num_warps=2)
# Two-warp programs per SM until the compiled kernel's registers say (decode._RESIDENT): 128 registers per thread
# with triton 3.6, four warps to an SM quarter (155 with triton 3.9: 6, learnt from the first launch).
TWO_WARP_PROGRAMS_PER_SM = 8
# Where short chunks of two-warp programs leave SMs with fewer than this many, chunks as short as
# TWO_WARP_MIN_BLOCKS_PER_SPLIT blocks make up to this many (H200, 2 KV heads at batch 1: 16k took 3-12 % less
# time in chunks of 2 blocks than of 4, with 4 programs per SM; 8 per SM, in chunks of 1 block at 16k or 2 at
# 32k, were slower than 4: docs/benchmarks.md, "Shorter chunks for two warps"). Where short chunks would make more
# two-warp programs than one wave holds, up to this many per SM take longer chunks, unless chunks that long are long
# enough for pair tables (LOOKUP_MIN_BLOCKS): then the short chunks run on one warp ("Longer chunks of two warps
# rather than one warp").
# With at least TWO_WARP_LONGER_MIN_ROWS query rows per KV head they take longer chunks, up to this many per SM,
# even where short chunks fit one wave of two-warp programs (6-8 rows: K4V4 1.00-1.11x, K2V2 1.02-1.17x and, where
# its launch changes, K3V3 0.98-1.04x as fast; 4 rows: 0.93-1.03x; docs/benchmarks.md, "Longer two-warp chunks at
# six query rows or more").
TWO_WARP_SHORT_PROGRAMS_PER_SM = 4
TWO_WARP_MIN_BLOCKS_PER_SPLIT = 2
TWO_WARP_LONGER_MIN_ROWS = 6
MAX_ROWS = 16  # query rows per program (the MMA's N axis): the output accumulator is DIM·ROWS/32 registers


def block_keys(dim: int) -> int:
    """Keys per step: two m16 tiles of keys (one at d = 256, whose operands would spill registers)."""
    return 32 if dim <= 128 else 16


def supports(dim: int, k_bits: int, v_bits: int, rows: int) -> bool:
    """Whether this kernel takes the shape (otherwise `decode` uses the Triton-language kernel)."""
    return dim in (64, 128, 256) and rows <= MAX_ROWS


def two_warps(dim: int, k_bits: int, v_bits: int, rows: int, lookup: bool) -> bool:
    """Whether programs of two warps can take the shape (`_attend_blocks_two_warps`): head_dim 128, keys and
    values of one width decoded in registers, at most 8 query rows (16 take 207 registers per thread with
    triton 3.9 at K4V4, too few programs per SM to gain). `decode` launches them where short chunks leave SMs
    half empty of one-warp programs; only there were they measured faster (docs/benchmarks.md, "Programs of
    two warps")."""
    return dim == 128 and k_bits == v_bits and rows <= 8 and not lookup


@gluon.jit
def _plane(entries, first: gl.constexpr, HIGH: gl.constexpr, WARPS: gl.constexpr):
    """Byte HIGH (0 low, 1 high) of the fp16 entries c[first .. first + 3] as one 4-byte table for `prmt`."""
    j = gl.arange(0, 4, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    bits = gl.load(entries + first + j).to(gl.int32) & 0xFFFF
    return gl.sum(((bits >> (8 * HIGH)) & 0xFF) << (8 * j), axis=0)


@gluon.jit
def _planes(table, BITS: gl.constexpr, WARPS: gl.constexpr):
    """The fp16 codebook `table` as the byte tables the decoders take: low bytes of c[0..3], of c[4..7], high
    bytes of c[0..3], of c[4..7], then the same for c[8..15] (4 bits); at 2 bits low and high of c[0..3]."""
    entries = table.to(gl.pointer_type(gl.int16))
    first = _plane(entries, 0, 0, WARPS)
    if BITS == 2:  # padded with copies (unused): one tuple shape for every width
        low = (first, _plane(entries, 0, 1, WARPS), first, first)
    else:
        low = (
            first,
            _plane(entries, 4, 0, WARPS),
            _plane(entries, 0, 1, WARPS),
            _plane(entries, 4, 1, WARPS),
        )
    if BITS < 4:
        return low + (first, first, first, first)
    return low + (
        _plane(entries, 8, 0, WARPS),
        _plane(entries, 12, 0, WARPS),
        _plane(entries, 8, 1, WARPS),
        _plane(entries, 12, 1, WARPS),
    )


@gluon.jit
def _pair_table(table, value_table, BITS: gl.constexpr, VALUES: gl.constexpr):
    """The fp16 pairs (c[e mod 2^BITS], c[e >> BITS]) of a BITS-bit codebook for every 2·BITS-bit field e of two
    codes, as int32 words in shared memory, PAIR_COPIES copies of each entry side by side (entry e, copy k at word
    copies·e + k); VALUES (3 bits): the value codebook's table follows the keys'."""
    ENTRIES: gl.constexpr = 1 << (2 * BITS)
    ROWS: gl.constexpr = 2 * ENTRIES if VALUES else ENTRIES
    COPIES: gl.constexpr = _COPIES4 if BITS == 4 else _COPIES3
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
    row = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))[:, None]
    e = row % ENTRIES
    entries = gl.where(
        row < ENTRIES, table.to(gl.pointer_type(gl.int16)), value_table.to(gl.pointer_type(gl.int16))
    )
    low = gl.load(entries + (e & ((1 << BITS) - 1))).to(gl.int32) & 0xFFFF
    high = gl.load(entries + (e >> BITS)).to(gl.int32)
    words = gl.zeros([ROWS, COPIES], gl.int32, layout) + (low | (high << 16))
    return gl.allocate_shared_memory(
        gl.int32, [ROWS, COPIES], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), value=words
    )


@gluon.jit
def _table_base(pairs, like, BITS: gl.constexpr):
    """A tensor like `like` holding, in each lane, the shared-memory address of entry 0 of the lane's copy of
    the pair table (`_pair_table`: the kernel's largest shared memory, which the query's and the result's moves
    reuse before it is built and after the loop, so at the start of the dynamic shared window, which the compile
    test checks); reading one entry back keeps the table alive (the lookups are inline PTX the compiler does not
    see)."""
    _BARRIER()
    first = gl.sum(pairs.slice(0, 1).load(gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])), axis=1)
    return gl.inline_asm_elementwise(
        BASE4_ASM if BITS == 4 else BASE3_ASM, "=r,r,r", [like, gl.zeros_like(like) + gl.sum(first, axis=0)],
        dtype=gl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@gluon.jit
def _lookup_pairs(groups, base, BITS: gl.constexpr):
    """The 8 codes of each group (4 bits: an int32 word, 3 bits: 24 bits) as fp16 centroids, in order: each
    pair of codes one shared-memory read of the pair table at `base`."""
    return gl.inline_asm_elementwise(
        LOOKUP4_ASM if BITS == 4 else LOOKUP3_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [groups, base],
        dtype=(gl.float16,) * 8, is_pure=False, pack=1,
    )  # fmt: skip


@gluon.jit
def _is_sign_magnitude(table, BITS: gl.constexpr, WARPS: gl.constexpr = 1):
    """Whether the fp16 table, indexed by label, is a symmetric codebook's in sign-magnitude order
    (`packed.centroid_table(..., sign_magnitude=True)`): t[l ^ 2^(BITS−1)] = −t[l] bit for bit."""
    i = gl.arange(0, 1 << BITS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    entries = table.to(gl.pointer_type(gl.int16))
    mirrored = gl.load(entries + (i ^ (1 << (BITS - 1)))).to(gl.int32) ^ 0x8000
    return gl.sum((gl.load(entries + i).to(gl.int32) & 0xFFFF) != (mirrored & 0xFFFF), axis=0) == 0


@gluon.jit
def _decode(groups, planes, SYMMETRIC: gl.constexpr, BITS: gl.constexpr):
    """Eight fp16 tensors: the codes of each int32 group in CODE_ORDER_<BITS>, looked up by byte permutes in
    `_planes`; SYMMETRIC (4 bits): sign-magnitude labels of a symmetric codebook, so the shorter decode applies."""
    zero = gl.zeros_like(groups)
    if BITS == 2:
        return gl.inline_asm_elementwise(
            DECODE2_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [groups, zero + planes[0], zero + planes[1]],
            dtype=(gl.float16,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
    elif BITS == 3:
        return gl.inline_asm_elementwise(
            DECODE3_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
            [groups, zero + planes[0], zero + planes[1], zero + planes[2], zero + planes[3]],
            dtype=(gl.float16,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
    elif SYMMETRIC:
        return gl.inline_asm_elementwise(
            DECODE4_SIGN_MAGNITUDE_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
            [groups, zero + planes[0], zero + planes[1], zero + planes[2], zero + planes[3]],
            dtype=(gl.float16,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return gl.inline_asm_elementwise(
            PERMUTE4_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
            [groups, zero + planes[0], zero + planes[1], zero + planes[2], zero + planes[3],
             zero + planes[4], zero + planes[5], zero + planes[6], zero + planes[7]],
            dtype=(gl.float16,) * 8, is_pure=True, pack=1,
        )  # fmt: skip


@gluon.jit
def _code(i, BITS: gl.constexpr):
    """Which code of its group the decoder emits as output i (packed.CODE_ORDER_<BITS>)."""
    if BITS == 2:
        order: gl.constexpr = CODE_ORDER_2
    elif BITS == 3:
        order: gl.constexpr = CODE_ORDER_3
    else:
        order: gl.constexpr = CODE_ORDER_4
    return (order >> (4 * i)) & 7


@gluon.jit
def _interleave(e):
    """The eight planes e[0..7] as one tensor with three more axes of 2: plane 4·i2 + 2·i1 + i0 at (i0, i1, i2)."""
    low = gl.join(gl.join(e[0], e[1]), gl.join(e[2], e[3]))
    high = gl.join(gl.join(e[4], e[5]), gl.join(e[6], e[7]))
    return gl.join(low, high)


@gluon.jit
def _three_bit_groups(w0, w1, w2, EXACT: gl.constexpr = True):
    """Four 24-bit groups from three consecutive little-endian 32-bit words; EXACT: bits 24..31 zero, as the
    pair-table lookups need (the register decode never reads them, so without EXACT they hold what comes next)."""
    if EXACT:
        return (
            w0 & 0xFFFFFF,
            ((w0 >> 24) & 0xFF) | ((w1 << 8) & 0xFFFF00),
            ((w1 >> 16) & 0xFFFF) | ((w2 << 16) & 0xFF0000),
            (w2 >> 8) & 0xFFFFFF,
        )
    return w0, ((w0 >> 24) & 0xFF) | (w1 << 8), ((w1 >> 16) & 0xFFFF) | (w2 << 16), w2 >> 8


@gluon.jit
def _three_bit_lane_groups(
    codes, t, lane, stop, N: gl.constexpr, DIM: gl.constexpr, EXACT: gl.constexpr = True
):
    """int32 groups [T, L, N] of 3-bit rows `t` (those >= stop read as 0): lane l's N groups are the 3N
    bytes at byte 3N·l of each row, read as whole int32 words where N is a multiple of 4 (3 words per 4
    groups), as three int16 halves where N = 2, and where N = 1 as the aligned word that holds the first
    byte and, where the three bytes cross into it, the next word, shifted together: bits 24..31 of such a
    group hold the next group's first byte (or 0), which the register decode (`_decode`) never reads.
    EXACT (N >= 4): as `_three_bit_groups`."""
    row_bytes: gl.constexpr = DIM // 8 * 3
    valid = t < stop
    if N == 1:
        at = codes.to(gl.pointer_type(gl.int32)) + t * (row_bytes // 4) + (3 * lane) // 4
        low = gl.load(at, mask=valid, other=0)
        high = gl.load(at + 1, mask=valid & (3 * lane % 4 > 1), other=0)  # never past the row's last word
        groups = gl.inline_asm_elementwise(
            "shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", [low, high, gl.zeros_like(low) + 8 * (3 * lane % 4)],
            dtype=gl.int32, is_pure=True, pack=1,
        )  # fmt: skip
    elif N == 2:
        at = codes.to(gl.pointer_type(gl.int16)) + t * (row_bytes // 2) + 3 * lane
        h0 = gl.load(at, mask=valid, other=0).to(gl.int32) & 0xFFFF
        h1 = gl.load(at + 1, mask=valid, other=0).to(gl.int32) & 0xFFFF
        h2 = gl.load(at + 2, mask=valid, other=0).to(gl.int32) & 0xFFFF
        groups = gl.join(h0 | ((h1 & 0xFF) << 16), (h1 >> 8) | (h2 << 8))
        groups = gl.reshape(groups, (t.shape[0], lane.shape[1], 2))
    else:
        gl.static_assert(N == 4 or N == 8, "3-bit groups per lane: 1, 2, 4 or 8")
        at = codes.to(gl.pointer_type(gl.int32)) + t * (row_bytes // 4) + (3 * N // 4) * lane
        groups = _three_bit_quad(at, valid, t.shape[0], lane.shape[1], EXACT)
        if N == 8:  # groups 4·q + i: the second quad's three words follow the first's
            second = _three_bit_quad(at + 3, valid, t.shape[0], lane.shape[1], EXACT)
            groups = gl.reshape(
                gl.permute(gl.join(groups, second), (0, 1, 3, 2)), (t.shape[0], lane.shape[1], 8)
            )
    return groups


@gluon.jit
def _three_bit_quad(at, valid, T: gl.constexpr, L: gl.constexpr, EXACT: gl.constexpr):
    """Four 24-bit groups [T, L, 4] from the three int32 words at `at` (`_three_bit_groups`)."""
    w0 = gl.load(at, mask=valid, other=0)
    w1 = gl.load(at + 1, mask=valid, other=0)
    w2 = gl.load(at + 2, mask=valid, other=0)
    g0, g1, g2, g3 = _three_bit_groups(w0, w1, w2, EXACT)
    return gl.reshape(gl.permute(gl.join(gl.join(g0, g1), gl.join(g2, g3)), (0, 1, 2, 4, 3)), (T, L, 4))


@gluon.jit
def _whole_groups(codes, t, group, stop, BITS: gl.constexpr, DIM: gl.constexpr):
    """Groups `group` of key rows `t` (broadcast together) at 2 or 4 bits, where each group is one whole
    int16 / int32 word, as int32 (rows >= stop read as 0)."""
    if BITS == 2:
        row = codes.to(gl.pointer_type(gl.int16)) + t * (DIM // 8) + group
        return gl.load(row, mask=t < stop, other=0).to(gl.int32) & 0xFFFF
    row = codes.to(gl.pointer_type(gl.int32)) + t * (DIM // 8) + group
    return gl.load(row, mask=t < stop, other=0)


@gluon.jit
def _key_groups(
    codes, block, stop, BITS: gl.constexpr, DIM: gl.constexpr, BLOCK_N: gl.constexpr, WARPS: gl.constexpr = 1
):  # fmt: skip
    """int32 groups [BLOCK_N, 4, W] (W = DIM/32) of keys block .. block + BLOCK_N − 1 (those >= stop read as
    0): lane (g, c) of the warp reads groups W·c .. W·c + W − 1 of its keys, DIM·BITS/32 contiguous bytes.
    In a program of two warps (BLOCK_N = 32) warp w reads keys 16w .. 16w + 15, its m16 tile of Sᵀ."""
    W: gl.constexpr = DIM // 32
    V: gl.constexpr = 1 if BITS == 3 else W  # 3 bits: lane c's 3W bytes loaded as words, halves or bytes
    if WARPS == 2:  # as the one-warp layout below, but key bit 4 picks the warp, not a register
        gl.static_assert(V == 1 or V == 4, "two warps: head_dim 128")
        words: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[8, 0, 0]] if V == 1 else [[0, 0, 1], [0, 0, 2], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0]],
            block_bases=[],
            shape=[BLOCK_N, 4, V],
        )
    else:
        words: gl.constexpr = gl.BlockedLayout([1, 1, V], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    t = block + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, words)))[:, None, None]
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, words)))[None, :, None]
    if BITS == 3:
        groups = _three_bit_lane_groups(codes, t, c, stop, W, DIM, WARPS == 1)  # two warps: never tables
    else:
        w = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, words)))[None, None, :]
        groups = _whole_groups(codes, t, W * c + w, stop, BITS, DIM)
    return groups


@gluon.jit
def _key_operand(
    groups, planes, SYMMETRIC: gl.constexpr, BITS: gl.constexpr, DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    LOOKUP: gl.constexpr,
):  # fmt: skip
    """The A operand [BLOCK_N keys, DIM] of Sᵀ = K·Qᵀ from `_key_groups`; column k holds stored coordinate
    `_key_coordinate(k)`. LOOKUP: `planes` are the lanes' pair-table addresses (`_table_base`)."""
    if LOOKUP:
        e = _interleave(_lookup_pairs(groups, planes, BITS))  # codes in order (`_key_coordinate`)
    else:
        e = _interleave(_decode(groups, planes, SYMMETRIC, BITS))  # [t, c, w, i0, i1, i2]
    # column k = 32·w + 16·i2 + 8·i1 + 2·c + i0: the mma.sync A fragment gives lane c the columns 2c, 2c + 1
    # (and + 8) of every 16, so each lane's own groups land in its own registers.
    return gl.reshape(gl.permute(e, (0, 2, 5, 4, 1, 3)), (BLOCK_N, DIM))


@gluon.jit
def _key_coordinate(k, BITS: gl.constexpr, DIM: gl.constexpr, LOOKUP: gl.constexpr):
    """The stored coordinate that column k of `_key_operand` holds."""
    c, w = (k >> 1) & 3, k >> 5
    i = (k & 1) | (((k >> 3) & 1) << 1) | (((k >> 4) & 1) << 2)
    return 8 * ((DIM // 32) * c + w) + (i if LOOKUP else _code(i, BITS))


@gluon.jit
def _value_groups(codes, block, stop, BITS: gl.constexpr, DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """int32 groups [BLOCK_N, 8, U] (U = DIM/64): lane (g, c) reads groups U·g .. U·g + U − 1 of its keys
    2c, 2c + 1 (and + 8, + 16 …), DIM·BITS/64 contiguous bytes each."""
    U: gl.constexpr = DIM // 64
    if BITS == 3:  # lane g's 3U bytes: loaded as words, halves or bytes, assembled into groups
        words: gl.constexpr = gl.BlockedLayout([2, 1, 1], [4, 8, 1], [1, 1, 1], [2, 0, 1])
    else:
        words: gl.constexpr = gl.BlockedLayout([2, 1, U], [4, 8, 1], [1, 1, 1], [2, 0, 1])
    t = block + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, words)))[:, None, None]
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, words)))[None, :, None]
    if BITS == 3:
        groups = _three_bit_lane_groups(codes, t, g, stop, U, DIM)
    else:
        u = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, words)))[None, None, :]
        groups = _whole_groups(codes, t, U * g + u, stop, BITS, DIM)
    return groups


@gluon.jit
def _value_operand(
    groups, planes, SYMMETRIC: gl.constexpr, BITS: gl.constexpr, DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    LOOKUP: gl.constexpr,
):  # fmt: skip
    """The A operand [DIM, BLOCK_N keys] of Oᵀ = Vᵀ·Pᵀ from `_value_groups`; row m holds stored coordinate
    `_value_coordinate(m)`. LOOKUP (3 bits): `planes` are the lanes' addresses of the values' pair table."""
    if LOOKUP:
        even, odd = _value_pair_words(groups, DIM, BLOCK_N)
        e = gl.join(_interleave(_lookup_pairs(even, planes, 3)), _interleave(_lookup_pairs(odd, planes, 3)))
        # [s, g, u, j0, j1, j2, q]: key 2s + j0, code 2·(j1 + 2·j2) + q, so that row m = 64·u + 32·j2 + 16·j1 +
        # 8·q + g holds code (m >> 3) & 7
        operand = gl.reshape(gl.permute(e, (2, 5, 4, 6, 1, 0, 3)), (DIM, BLOCK_N))
    else:
        e = _interleave(_decode(groups, planes, SYMMETRIC, BITS))  # [t, g, u, i0, i1, i2]
        # row m = 64·u + 32·i2 + 16·i1 + 8·i0 + g: the A fragment gives lane g the rows g and g + 8 of every 16.
        operand = gl.reshape(gl.permute(e, (2, 5, 4, 3, 1, 0)), (DIM, BLOCK_N))
    return operand


@gluon.jit
def _value_pair_words(groups, DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """3-bit `_value_groups` of keys 2s and 2s + 1 (one lane's) merged field by field into two 24-bit words whose
    six bits 6k .. 6k + 5 hold the two keys' code 2k (`even`) and code 2k + 1 (`odd`): the pairs the A operand
    of Oᵀ = Vᵀ·Pᵀ holds in one register, each one entry of the values' pair table."""
    a, b = gl.split(gl.permute(gl.reshape(groups, (BLOCK_N // 2, 2, 8, DIM // 64)), (0, 2, 3, 1)))
    return (a & 0x1C71C7) | ((b << 3) & 0xE38E38), ((a >> 3) & 0x1C71C7) | (b & 0xE38E38)


@gluon.jit
def _value_coordinate(m, BITS: gl.constexpr, DIM: gl.constexpr, LOOKUP: gl.constexpr):
    """The stored coordinate that row m of `_value_operand` holds."""
    i = (m >> 3) & 7
    return 8 * ((DIM // 64) * (m & 7) + (m >> 6)) + (i if LOOKUP else _code(i, BITS))


@gluon.jit
def _attend_blocks(
    q_op, q_scale, last_key, first_key, start, stop, kc, kn, vc, vn, k_planes, v_planes,
    K_BITS: gl.constexpr, V_BITS: gl.constexpr, DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
    SYMMETRIC: gl.constexpr, LOOKUP_KEYS: gl.constexpr, LOOKUP_VALUES: gl.constexpr,
):  # fmt: skip
    """The online softmax over keys start .. stop − 1 of one (sequence, KV head): (Oᵀ unnormalised, running
    max, running sum) per query row."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    op_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    key_axis: gl.constexpr = gl.SliceLayout(1, mma)
    row_axis: gl.constexpr = gl.SliceLayout(0, mma)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_axis)
    l_i = gl.zeros([ROWS], gl.float32, row_axis)
    acc = gl.zeros([DIM, ROWS], gl.float32, mma)
    k_groups = _key_groups(kc, start, stop, K_BITS, DIM, BLOCK_N)
    v_groups = _value_groups(vc, start, stop, V_BITS, DIM, BLOCK_N)
    if LOOKUP_VALUES:  # the values' table follows the keys'
        even, _ = _value_pair_words(v_groups, DIM, BLOCK_N)
        v_planes = _table_base(k_planes, even, K_BITS) + _TABLE3_BYTES
    if LOOKUP_KEYS:  # k_planes: the pair table in shared memory
        k_planes = _table_base(k_planes, k_groups, K_BITS)
    # The next block's key norms (at 2 bits its value norms too) load at the end of this one, live only across
    # the back edge, so the loop does not wait on them after its first product (docs/benchmarks.md, "Norms
    # loaded a block ahead": faster at 2 and 3 bits, slower with 3-bit value norms or at 4 bits).
    KEY_NORMS_AHEAD: gl.constexpr = K_BITS < 4 and V_BITS < 4
    VALUE_NORMS_AHEAD: gl.constexpr = K_BITS == 2 and V_BITS == 2
    keys = start + gl.arange(0, BLOCK_N, layout=key_axis)
    if KEY_NORMS_AHEAD:
        k_norm = gl.load(kn + keys, mask=keys < stop, other=0.0)
    if VALUE_NORMS_AHEAD:
        v_norm = gl.load(vn + keys, mask=keys < stop, other=0.0)
    for block in range(start, stop, BLOCK_N):
        # the next block's codes load while this one computes
        k_next = _key_groups(kc, block + BLOCK_N, stop, K_BITS, DIM, BLOCK_N)
        v_next = _value_groups(vc, block + BLOCK_N, stop, V_BITS, DIM, BLOCK_N)
        keys = block + gl.arange(0, BLOCK_N, layout=key_axis)
        key_valid = keys < stop
        if not KEY_NORMS_AHEAD:
            k_norm = gl.load(kn + keys, mask=key_valid, other=0.0)
        k_op = gl.convert_layout(
            _key_operand(k_groups, k_planes, SYMMETRIC, K_BITS, DIM, BLOCK_N, LOOKUP_KEYS),
            op_a,
            assert_trivial=True,
        )
        s = mma_v2(k_op, q_op, gl.zeros([BLOCK_N, ROWS], gl.float32, mma))
        s = s * k_norm.to(gl.float32)[:, None] * q_scale[None, :]
        seen = key_valid[:, None] & (keys[:, None] <= last_key[None, :]) & (keys[:, None] >= first_key)
        s = gl.where(seen, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = gl.exp2(s - m_shift[None, :])
        alpha = gl.exp2(m_i - m_shift)
        l_i = l_i * alpha + gl.sum(p, axis=0)
        if not VALUE_NORMS_AHEAD:
            v_norm = gl.load(vn + keys, mask=key_valid, other=0.0)
        p_op = gl.convert_layout((p * v_norm.to(gl.float32)[:, None]).to(gl.float16), op_b)
        v_op = gl.convert_layout(
            _value_operand(v_groups, v_planes, SYMMETRIC, V_BITS, DIM, BLOCK_N, LOOKUP_VALUES),
            op_a,
            assert_trivial=True,
        )
        acc = mma_v2(v_op, p_op, acc * alpha[None, :])
        m_i = m_new
        k_groups, v_groups = k_next, v_next
        if KEY_NORMS_AHEAD:
            k_norm = gl.load(kn + keys + BLOCK_N, mask=keys + BLOCK_N < stop, other=0.0)
        if VALUE_NORMS_AHEAD:
            v_norm = gl.load(vn + keys + BLOCK_N, mask=keys + BLOCK_N < stop, other=0.0)

    return acc, m_i, l_i


@gluon.jit
def _value_groups_two_warps(codes, block, stop, BITS: gl.constexpr, DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """`_value_groups` (d = 128) for a program of two warps: warp u's lane g reads group 8u + g, so that each
    warp's lanes read contiguous words (at 3 bits, one group of three bytes per lane and key)."""
    halves: gl.constexpr = gl.BlockedLayout([2, 1, 1], [4, 8, 1], [1, 1, 2], [2, 0, 1])
    t = block + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, halves)))[:, None, None]
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, halves)))[None, :, None]
    u = gl.arange(0, DIM // 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, halves)))[None, None, :]
    if BITS == 3:
        groups = _three_bit_lane_groups(codes, t, 8 * u + g, stop, 1, DIM)
    else:
        groups = _whole_groups(codes, t, 8 * u + g, stop, BITS, DIM)
    return groups


@gluon.jit
def _value_operand_two_warps(groups, planes, SYMMETRIC: gl.constexpr, BITS: gl.constexpr, DIM: gl.constexpr):
    """`_value_operand` from `_value_groups_two_warps`: [t, g, u, i0, i1, i2] to row m = 64·i2 + 32·i1 + 16·u +
    8·i0 + g, since the MMA gives warp u the m16 tiles whose bit 4 is u (`_value_coordinate_two_warps`)."""
    e = _interleave(_decode(groups, planes, SYMMETRIC, BITS))
    return gl.reshape(gl.permute(e, (5, 4, 2, 3, 1, 0)), (DIM, groups.shape[0]))


@gluon.jit
def _value_coordinate_two_warps(m, BITS: gl.constexpr):
    """The stored coordinate that row m of `_value_operand_two_warps` holds."""
    i = ((m >> 3) & 1) | (((m >> 5) & 1) << 1) | (((m >> 6) & 1) << 2)
    return 8 * (8 * ((m >> 4) & 1) + (m & 7)) + _code(i, BITS)


@gluon.jit
def _attend_blocks_two_warps(
    q_op, q_scale, last_key, first_key, start, stop, kc, kn, vc, vn, k_planes, v_planes,
    K_BITS: gl.constexpr, V_BITS: gl.constexpr, DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
    SYMMETRIC: gl.constexpr,
):  # fmt: skip
    """`_attend_blocks` in a program of two warps, each doing half of every block's work: warp w decodes and
    scores keys 16w .. 16w + 15 over all coordinates, and decodes and sums the values of all 32 keys over its
    half of the coordinates. The block's per-row maxima and P cross between the warps through shared memory
    (one barrier after each is written: a warp rewrites them only after the other has passed the next
    barrier, so after its reads); each warp keeps the running sums of its own keys, added once after the
    loop. At batch 1 with few KV heads, where one-warp programs leave most of an
    SM's schedulers idle and a warp waits on its own instructions' latencies, this halves the chain per warp."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 1], instr_shape=[16, 8])
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    op_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    key_axis: gl.constexpr = gl.SliceLayout(1, mma)
    row_axis: gl.constexpr = gl.SliceLayout(0, mma)
    # each thread holds both warps' maxima
    both_rows: gl.constexpr = gl.BlockedLayout([2, 1], [1, 32], [1, 2], [1, 0])
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    maxima = gl.allocate_shared_memory(gl.float32, [2, ROWS], flat)
    probabilities = gl.allocate_shared_memory(gl.float16, [BLOCK_N, ROWS], flat)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_axis)
    sums = gl.zeros([BLOCK_N, ROWS], gl.float32, mma)  # per key slot: each warp's own keys
    acc = gl.zeros([DIM, ROWS], gl.float32, mma)
    k_groups = _key_groups(kc, start, stop, K_BITS, DIM, BLOCK_N, 2)
    v_groups = _value_groups_two_warps(vc, start, stop, V_BITS, DIM, BLOCK_N)
    # The next block's value norms, loaded at the block's end: loaded after the barrier, where they are used, both
    # warps waited on memory; at the block's top, K4V4 took 151 registers, not 128 (triton 3.6, no padding).
    first = start + gl.arange(0, BLOCK_N, layout=key_axis)
    v_norm = gl.load(vn + first, mask=first < stop, other=0.0)
    for block in range(start, stop, BLOCK_N):
        k_next = _key_groups(kc, block + BLOCK_N, stop, K_BITS, DIM, BLOCK_N, 2)
        v_next = _value_groups_two_warps(vc, block + BLOCK_N, stop, V_BITS, DIM, BLOCK_N)
        keys = block + gl.arange(0, BLOCK_N, layout=key_axis)
        key_valid = keys < stop
        k_norm = gl.load(kn + keys, mask=key_valid, other=0.0)
        k_op = gl.convert_layout(
            _key_operand(k_groups, k_planes, SYMMETRIC, K_BITS, DIM, BLOCK_N, False),
            op_a,
            assert_trivial=True,
        )
        s = mma_v2(k_op, q_op, gl.zeros([BLOCK_N, ROWS], gl.float32, mma))
        s = s * k_norm.to(gl.float32)[:, None] * q_scale[None, :]
        seen = key_valid[:, None] & (keys[:, None] <= last_key[None, :]) & (keys[:, None] >= first_key)
        s = gl.where(seen, s, float("-inf"))
        maxima.store(gl.max(gl.reshape(s, (2, BLOCK_N // 2, ROWS)), axis=1))  # row w: warp w's keys
        _BARRIER()
        m_new = gl.maximum(m_i, gl.convert_layout(gl.max(maxima.load(both_rows), axis=0), row_axis))
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = gl.exp2(s - m_shift[None, :])
        alpha = gl.exp2(m_i - m_shift)
        sums = sums * alpha[None, :] + p
        probabilities.store((p * v_norm.to(gl.float32)[:, None]).to(gl.float16))
        _BARRIER()
        v_op = gl.convert_layout(
            _value_operand_two_warps(v_groups, v_planes, SYMMETRIC, V_BITS, DIM), op_a, assert_trivial=True
        )
        acc = mma_v2(v_op, probabilities.load(op_b), acc * alpha[None, :])
        m_i = m_new
        k_groups, v_groups = k_next, v_next
        v_norm = gl.load(vn + keys + BLOCK_N, mask=keys + BLOCK_N < stop, other=0.0)
    return acc, m_i, gl.sum(sums, axis=0)


@gluon.constexpr_function
def _coordinate_major(by_coordinate, DIM, ROWS, WARPS):
    """A [DIM, ROWS] layout whose lanes take the first five of `by_coordinate` (offsets along DIM, in the order of
    the stored coordinate bits they set) and whose registers take the rest and the rows; in two-warp programs the
    warps take the top row bit, so that each row stays within one warp."""
    row_bits = [1 << j for j in range(ROWS.bit_length() - 1)]
    warp_rows = row_bits[-1:] if WARPS == 2 else []
    return gl.DistributedLinearLayout(
        reg_bases=[[k, 0] for k in by_coordinate[5:]] + [[0, r] for r in row_bits if r not in warp_rows],
        lane_bases=[[k, 0] for k in by_coordinate[:5]],
        warp_bases=[[0, r] for r in warp_rows],
        block_bases=[],
        shape=[DIM, ROWS],
    )


@gluon.constexpr_function
def _query_layout(DIM, ROWS, WARPS):
    """The layout in which each program loads Qᵀ [DIM, ROWS] (column k holds stored coordinate
    `_key_coordinate(k)`): the lanes take the key bits that `_key_coordinate` sends to the coordinate's five low
    bits, so that each warp-wide load reads 32 consecutive coordinates of one query row, 128 bytes. A layout in
    the operand's own order reads 32 sectors of 8 rows per load, and at batch 1 every program reads the same few
    rows at the same time, so their requests queue at the L2 slices that hold those rows: this one was 1.00–1.06×
    as fast at batch 1 (docs/benchmarks.md, "The query loaded 128 bytes at a time")."""
    DIM, ROWS, WARPS = (int(getattr(v, "value", v)) for v in (DIM, ROWS, WARPS))
    group_bits = [32 << j for j in range((DIM // 32).bit_length() - 1)]  # k bits of w
    return _coordinate_major([1, 8, 16] + group_bits + [2, 4], DIM, ROWS, WARPS)


@gluon.constexpr_function
def _result_layout(DIM, ROWS, WARPS):
    """The layout in which each program writes its partial result Oᵀ [DIM, ROWS] (row m holding stored coordinate
    `_value_coordinate(m)`, or `_value_coordinate_two_warps(m)`): the lanes take the bits of m that set the
    coordinate's five low bits, so that each warp-wide store writes 128 consecutive bytes of one row, as
    `_query_layout` reads the query. The accumulator's own layout wrote 4 bytes into each of up to 24 sectors per
    store (12/2 heads), 8 times the sectors; moving the result into this layout first (through shared memory)
    made batch 1 with 2 KV heads 1.02–1.23× as fast (docs/benchmarks.md, "Partial results written 128 bytes at a
    time")."""
    DIM, ROWS, WARPS = (int(getattr(v, "value", v)) for v in (DIM, ROWS, WARPS))
    if WARPS == 2:  # coordinate bits 0 .. 6 from bits 3, 5, 6 (the code's place), 0, 1, 2 and 4 of m
        by_coordinate = [3, 5, 6, 0, 1, 2, 4]
    else:  # bits 3, 4, 5 (the code's place), then m >> 6, then m & 7
        by_coordinate = [3, 4, 5] + list(range(6, DIM.bit_length() - 1)) + [0, 1, 2]
    return _coordinate_major([1 << m for m in by_coordinate], DIM, ROWS, WARPS)


@gluon.jit
def _attend_chunk_mma(
    query, k_codes, k_norms, v_codes, v_norms, k_table, v_table, lengths, starts, part_out, part_lse,
    scale_log2, chunk, splits, causal_shift,
    q_stride_b, q_stride_h, q_stride_t,
    kc_stride_b, kc_stride_h, kn_stride_b, kn_stride_h,
    vc_stride_b, vc_stride_h, vn_stride_b, vn_stride_h, key_mean, value_mean,
    KV_HEADS: gl.constexpr, GROUP: gl.constexpr, Q_LEN: gl.constexpr, DIM: gl.constexpr,
    K_BITS: gl.constexpr, V_BITS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, PADDED: gl.constexpr,
    KEY_MEAN: gl.constexpr, VALUE_MEAN: gl.constexpr, LOOKUP_KEYS: gl.constexpr, LAUNCH_MERGE: gl.constexpr = False,
    WARPS: gl.constexpr = 1,
):  # fmt: skip
    if LAUNCH_MERGE:  # the merge may start its launch now; it waits for this grid's results on the device
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0 $1",
            "=r,r",
            [gl.program_id(0)],
            dtype=gl.int32,
            is_pure=False,
            pack=1,
        )
    gl.static_assert(not LOOKUP_KEYS or K_BITS >= 3, "pair tables hold 3- or 4-bit codes")
    gl.static_assert(WARPS == 1 or (DIM == 128 and not LOOKUP_KEYS), "`two_warps`")
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8]
    )
    op_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # With both codebooks in pair tables (K3V3) the query and the result keep the tensor cores' order, moved by
    # shuffles: with `_query_layout` and `_result_layout` ptxas placed the loop's loads later and batch 16 with 8
    # KV heads took 1-2 % longer, on 2x SDPA's line (with 2, 4-10 % less at 16k-32k; docs/benchmarks.md, "Pair
    # tables in a nearly full wave, and the 128-byte moves beside 4-bit tables").
    LOOKUP_VALUES: gl.constexpr = LOOKUP_KEYS and K_BITS == 3 and V_BITS == 3
    if LOOKUP_VALUES:
        query_layout: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [WARPS, 1], [0, 1])
    else:
        query_layout: gl.constexpr = _query_layout(DIM, ROWS, WARPS)
    row_axis: gl.constexpr = gl.SliceLayout(0, mma)

    bh, split = gl.program_id(0), gl.program_id(1)
    b, h = bh // KV_HEADS, bh % KV_HEADS
    length = gl.load(lengths + b).to(gl.int32)
    first_key = gl.load(starts + b).to(gl.int32) if PADDED else 0  # keys before it are padding
    if chunk == 0:  # a launch that does not depend on the lengths: this sequence's keys split evenly
        chunk = gl.cdiv(length, splits * BLOCK_N) * BLOCK_N
    start = gl.maximum(split * chunk, first_key // BLOCK_N * BLOCK_N)
    stop = gl.minimum(split * chunk + chunk, length)

    # Qᵀ [DIM, ROWS] in the keys' coordinate order, each row scaled to max |·| = 1 for fp16 operands.
    k_of = gl.arange(0, DIM, layout=gl.SliceLayout(1, query_layout))
    r_of = gl.arange(0, ROWS, layout=gl.SliceLayout(0, query_layout))
    q_at = (
        query
        + b.to(gl.int64) * q_stride_b
        + (h * GROUP + r_of // Q_LEN) * q_stride_h
        + (r_of % Q_LEN) * q_stride_t
    )
    q = (
        gl.load(
            q_at[None, :] + _key_coordinate(k_of, K_BITS, DIM, LOOKUP_KEYS)[:, None],
            mask=(r_of < GROUP * Q_LEN)[None, :],
            other=0.0,
        ).to(gl.float32)
        * scale_log2
    )
    q_scale = gl.max(gl.abs(q), axis=0)
    q_scale = gl.where(q_scale > 0, q_scale, 1.0)
    q_op = gl.convert_layout((q / q_scale[None, :]).to(gl.float16), op_b)
    q_scale = gl.convert_layout(q_scale, row_axis)
    rows = gl.arange(0, ROWS, layout=row_axis)
    last_key = length - Q_LEN + rows % Q_LEN + causal_shift  # causal among the step's own tokens

    kc = k_codes + b.to(gl.int64) * kc_stride_b + h.to(gl.int64) * kc_stride_h
    kn = k_norms + b.to(gl.int64) * kn_stride_b + h.to(gl.int64) * kn_stride_h
    vc = v_codes + b.to(gl.int64) * vc_stride_b + h.to(gl.int64) * vc_stride_h
    vn = v_norms + b.to(gl.int64) * vn_stride_b + h.to(gl.int64) * vn_stride_h

    v_planes = _planes(v_table, V_BITS, WARPS)
    k_planes = (
        _pair_table(k_table, v_table, K_BITS, LOOKUP_VALUES)
        if LOOKUP_KEYS
        else _planes(k_table, K_BITS, WARPS)
    )
    labels = (K_BITS < 4 or _is_sign_magnitude(k_table, K_BITS, WARPS)) and (
        V_BITS < 4 or _is_sign_magnitude(v_table, V_BITS, WARPS)
    )
    # One loop per decoder: a branch inside costs registers. A branch is taken only where 4-bit codes make
    # `labels` a check on the device: one on a constant is kept whole, and triton 3.6 fails to compile its loads.
    if WARPS == 2 and (K_BITS == 4 or V_BITS == 4) and labels:
        acc, m_i, l_i = _attend_blocks_two_warps(
            q_op, q_scale, last_key, first_key, start, stop, kc, kn, vc, vn, k_planes, v_planes,
            K_BITS, V_BITS, DIM, ROWS, BLOCK_N, True,
        )  # fmt: skip
    elif WARPS == 2:
        acc, m_i, l_i = _attend_blocks_two_warps(
            q_op, q_scale, last_key, first_key, start, stop, kc, kn, vc, vn, k_planes, v_planes,
            K_BITS, V_BITS, DIM, ROWS, BLOCK_N, False,
        )  # fmt: skip
    elif (K_BITS == 4 or V_BITS == 4) and labels:
        acc, m_i, l_i = _attend_blocks(
            q_op, q_scale, last_key, first_key, start, stop, kc, kn, vc, vn, k_planes, v_planes,
            K_BITS, V_BITS, DIM, ROWS, BLOCK_N, True, LOOKUP_KEYS, LOOKUP_VALUES,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _attend_blocks(
            q_op, q_scale, last_key, first_key, start, stop, kc, kn, vc, vn, k_planes, v_planes,
            K_BITS, V_BITS, DIM, ROWS, BLOCK_N, False, LOOKUP_KEYS, LOOKUP_VALUES,
        )  # fmt: skip

    # After the loop (no registers held through it): codes of x − μ (`decode.decode_attention`'s means).
    m_of = gl.arange(0, DIM, layout=gl.SliceLayout(1, mma))
    part = (bh * splits + split) * ROWS + rows
    out = acc / gl.where(l_i > 0, l_i, 1.0)[None, :]
    seen = (l_i > 0).to(gl.float32)
    if LOOKUP_VALUES:
        result_layout: gl.constexpr = mma
    else:
        result_layout: gl.constexpr = _result_layout(DIM, ROWS, WARPS)
        out = gl.convert_layout(out, result_layout)
        seen = gl.convert_layout(seen, gl.SliceLayout(0, result_layout))
    m_at = gl.arange(0, DIM, layout=gl.SliceLayout(1, result_layout))
    r_at = gl.arange(0, ROWS, layout=gl.SliceLayout(0, result_layout))
    if WARPS == 2:
        coordinate = _value_coordinate_two_warps(m_at, V_BITS)
    else:
        coordinate = _value_coordinate(m_at, V_BITS, DIM, LOOKUP_VALUES)
    if VALUE_MEAN:  # a row that saw any code adds Σ p μ = μ
        out += gl.load(value_mean + h * DIM + coordinate)[:, None] * seen[None, :]
    part_at = (bh * splits + split) * ROWS + r_at
    gl.store(
        part_out + part_at[None, :] * DIM + coordinate[:, None], out, mask=(r_at < GROUP * Q_LEN)[None, :]
    )
    lse = m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0))
    if KEY_MEAN:  # every score of a row plus scale · q·μ
        row_at = (
            query
            + b.to(gl.int64) * q_stride_b
            + (h * GROUP + rows // Q_LEN) * q_stride_h
            + (rows % Q_LEN) * q_stride_t
        )
        q_t = gl.load(row_at[None, :] + m_of[:, None], mask=(rows < GROUP * Q_LEN)[None, :], other=0.0)
        lse += gl.sum(q_t.to(gl.float32) * gl.load(key_mean + h * DIM + m_of)[:, None], axis=0) * scale_log2
    gl.store(part_lse + part, gl.where(l_i > 0, lse, float("-inf")), mask=rows < GROUP * Q_LEN)
