"""Reading bit-packed TurboQuant-MSE codes inside Triton kernels, as fp16 centroids in coordinate order.

`pack_bits` puts coordinate i of a row at bits [i·b, i·b + b) of a little-endian bit stream, so every 8
coordinates fill exactly b bytes: group g is the b-byte word starting at byte g·b, and coordinate 8g + e is
(group >> b·e) & (2^b − 1) — for b = 3 too, whose codes straddle bytes but never a group. Groups are read
as int32 (b = 4) or int16 (b = 2) words, or assembled from three bytes (b = 3), the codes cut out with shifts and masks,
and each code looked up in the fp16 codebook held in registers: `tl.gather` along a warp's lanes is one
shuffle per code, where a gather from memory costs an L1 wavefront per distinct sector. At b = 2 the lookup
takes two codes at once: a 16-entry table of fp16 pairs (one int32 each) fits a warp's lanes just as well,
and halves the shuffles and the shifts (32 % fewer instructions per block of keys, counted in the sm_90
SASS; at b = 3 and 4 the pair tables of 64 and 256 entries would not fit). Shuffles share the L1/shared-
memory pipe that bounds the decode kernel (Nsight Compute), so on a GPU 4-bit codes take none: byte
permutes on the integer ALUs decode them (`_permute_decode`); the interpreter keeps `tl.gather`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_BITS, MAX_BITS = 2, 4  # rows of whole int32 words at every head_dim >= 32; a codebook within a warp


def check_code_bits(row_bytes: int, dim: int, what: str) -> int:
    """Bits per coordinate of packed rows of `row_bytes` bytes holding `dim` codes."""
    if dim < 32 or dim & (dim - 1):
        raise ValueError(f"{what}: head_dim={dim} must be a power of two >= 32 for the Triton kernels")
    bits, rest = divmod(8 * row_bytes, dim)
    if rest or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{what}: rows of {row_bytes} bytes do not hold {dim} codes of {MIN_BITS}..{MAX_BITS} bits "
            f"(expected packed_row_bytes({dim}, bits) = {dim // 8}·bits bytes)"
        )
    return bits


# 4-bit index i and its sign-magnitude label: i for i < 8, i ^ 7 for i >= 8 (the map is its own inverse)
_LABELS = torch.arange(16) ^ (7 * (torch.arange(16) >> 3))
_LABEL_BYTES = (_LABELS[torch.arange(256) >> 4] << 4 | _LABELS[torch.arange(256) & 15]).to(torch.uint8)


def centroid_table(centroids: torch.Tensor, sign_magnitude: bool = False) -> torch.Tensor:
    """The fp16 codebook the kernels look codes up in (from codec.centroids): build it once per codec.
    sign_magnitude (4 bits): indexed by `sign_magnitude` labels instead of the codec's indices."""
    levels = centroids.numel()
    if levels not in [1 << b for b in range(MIN_BITS, MAX_BITS + 1)]:
        raise ValueError(
            f"a codebook of {levels} centroids is not 2^bits with bits in {MIN_BITS}..{MAX_BITS}"
        )
    if sign_magnitude and levels != 16:
        raise ValueError(f"sign-magnitude labels are 4-bit codes; this codebook has {levels} centroids")
    table = centroids[_LABELS.to(centroids.device)] if sign_magnitude else centroids
    return table.to(torch.float16).contiguous()


def sign_magnitude(indices: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit codes (uint8, two per byte, `pack_bits`' layout) with each index i >= 8 relabelled i ^ 7,
    and labels back to indices (the map is its own inverse). For a codebook symmetric about 0 (c[15 − i] =
    −c[i], as Lloyd-Max's are) label l is the centroid −c[l & 7] when l >= 8 and c[l] otherwise: its top bit
    is the sign and its low 3 bits index c[0..7], which the register decode reads straight
    (`DECODE4_SIGN_MAGNITUDE_ASM`); the cache stores 4-bit codes so (`quantize_tables(..., sign_magnitude=True)`)."""
    return _LABEL_BYTES.to(indices.device)[indices.long()]


@triton.jit
def _pair_table(codebook):
    """The 16 ordered pairs of a 2-bit codebook as int32 words: bits 0–15 c[p & 3], bits 16–31 c[p >> 2]
    (fp16), so that one lookup decodes a 4-bit field of two consecutive codes."""
    pairs = tl.arange(0, 16)
    low = tl.gather(codebook, pairs & 3, axis=0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = tl.gather(codebook, pairs >> 2, axis=0).to(tl.int16, bitcast=True).to(tl.int32)
    return low | (high << 16)


@triton.jit
def decode_table(table, BITS: tl.constexpr):
    """What `load_centroids` looks codes up in, held in registers: from the fp16 codebook `table` (pointer
    to centroid_table's 2^BITS entries), the codebook itself or, at 2 bits, its pair table."""
    lookup = tl.load(table + tl.arange(0, 1 << BITS))
    if BITS == 2:
        lookup = _pair_table(lookup)
    return lookup


@triton.jit
def _split_pairs(pairs):
    """The two fp16 values packed in each int32 word (low half first)."""
    low = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    high = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return low, high


PERMUTE4_ASM = tl.constexpr(
    """{ .reg .b32 m, w4, ln, lp, hn, hp, k, l, h;
    and.b32 m, $8, 0x77777777; shl.b32 w4, $8, 4;
    prmt.b32 ln, $9, $10, m; prmt.b32 lp, $13, $14, m; prmt.b32 hn, $11, $12, m; prmt.b32 hp, $15, $16, m;
    prmt.b32 k, w4, $8, 0xD9C8;
    lop3.b32 l, lp, ln, k, 0xE4; lop3.b32 h, hp, hn, k, 0xE4;
    prmt.b32 k, l, h, 0x5140; mov.b32 {$0, $1}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$2, $3}, k;
    shr.b32 m, m, 16;
    prmt.b32 ln, $9, $10, m; prmt.b32 lp, $13, $14, m; prmt.b32 hn, $11, $12, m; prmt.b32 hp, $15, $16, m;
    prmt.b32 k, w4, $8, 0xFBEA;
    lop3.b32 l, lp, ln, k, 0xE4; lop3.b32 h, hp, hn, k, 0xE4;
    prmt.b32 k, l, h, 0x5140; mov.b32 {$4, $5}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$6, $7}, k; }"""
)
"""The byte-permute decode of 8 4-bit codes ($8) into fp16 centroids ($0..$7, in order): $9..$12 are the low and
high bytes of c[0..7] (`_byte_planes(codebook, 0)`), $13..$16 those of c[8..15]. See `_permute_decode`."""

# The decoders below serve `decode_mma`, which feeds their fp16 outputs straight into tensor-core operands.
# The order in which each decoder emits the 8 codes of a group (nibble j: the code at output j): 4 bits in
# order, 2 bits evens then odds, 3 bits as its selectors assemble them.
CODE_ORDER_2 = tl.constexpr(0x75316420)
CODE_ORDER_3 = tl.constexpr(0x75634210)
CODE_ORDER_4 = tl.constexpr(0x76543210)

DECODE3_ASM = tl.constexpr(
    """{ .reg .b32 s, y, t, l, h, k;
    and.b32 s, $8, 0x7007; shl.b32 t, $8, 1; and.b32 t, t, 0x70; or.b32 s, s, t;
    shl.b32 t, $8, 2; and.b32 t, t, 0x700; or.b32 s, s, t;
    prmt.b32 l, $9, $10, s; prmt.b32 h, $11, $12, s;
    prmt.b32 k, l, h, 0x5140; mov.b32 {$0, $1}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$2, $3}, k;
    shr.b32 y, $8, 9; and.b32 s, y, 0x7007; shl.b32 t, y, 2; and.b32 t, t, 0x700; or.b32 s, s, t;
    shr.b32 t, y, 5; and.b32 t, t, 0x70; or.b32 s, s, t;
    prmt.b32 l, $9, $10, s; prmt.b32 h, $11, $12, s;
    prmt.b32 k, l, h, 0x5140; mov.b32 {$4, $5}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$6, $7}, k; }"""
)
"""The 8 3-bit codes of a 24-bit group ($8) as fp16 centroids: selectors put codes 0, 1, 2, 4 and then 3, 6,
5, 7 one per nibble; `prmt` looks their low and high bytes up in c[0..7] ($9, $10 low bytes, $11, $12 high)."""

DECODE2_ASM = tl.constexpr(
    """{ .reg .b32 s, l, h, k;
    and.b32 s, $8, 0x3333; prmt.b32 l, $9, $9, s; prmt.b32 h, $10, $10, s;
    prmt.b32 k, l, h, 0x5140; mov.b32 {$0, $1}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$2, $3}, k;
    shr.b32 s, $8, 2; and.b32 s, s, 0x3333; prmt.b32 l, $9, $9, s; prmt.b32 h, $10, $10, s;
    prmt.b32 k, l, h, 0x5140; mov.b32 {$4, $5}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$6, $7}, k; }"""
)
"""The 8 2-bit codes of a 16-bit group ($8), even codes first: masks put 4 codes one per nibble; `prmt` looks
their low and high bytes up in c[0..3] ($9 low bytes, $10 high)."""


DECODE4_SIGN_MAGNITUDE_ASM = tl.constexpr(
    """{ .reg .b32 j, w4, l, h, k;
    and.b32 j, $8, 0x77777777; shl.b32 w4, $8, 4;
    prmt.b32 l, $9, $10, j; prmt.b32 h, $11, $12, j; prmt.b32 k, w4, $8, 0xD9C8; and.b32 k, k, 0x80808080;
    xor.b32 h, h, k; prmt.b32 k, l, h, 0x5140; mov.b32 {$0, $1}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$2, $3}, k;
    shr.b32 j, j, 16;
    prmt.b32 l, $9, $10, j; prmt.b32 h, $11, $12, j; prmt.b32 k, w4, $8, 0xFBEA; and.b32 k, k, 0x80808080;
    xor.b32 h, h, k; prmt.b32 k, l, h, 0x5140; mov.b32 {$4, $5}, k; prmt.b32 k, l, h, 0x7362; mov.b32 {$6, $7}, k; }"""
)
"""The 8 4-bit sign-magnitude labels of a group ($8, `sign_magnitude`) in order, for a codebook symmetric about
0: each label's low 3 bits look up c[0..7] ($9, $10 low bytes, $11, $12 high) and its top bit becomes the sign.
A quarter fewer integer instructions than `PERMUTE4_ASM`, which has to look up both halves of the codebook and
pick one; codes stored as the codec's indices would first need the low bits of every index >= 8 flipped."""


@triton.jit
def _byte_planes(codebook, first: tl.constexpr):
    """Bytes 0 (lo) and 1 (hi) of the fp16 entries c[first .. first + 7] as two pairs of int32 words, four
    bytes each: the 8-byte tables one `prmt` indexes."""
    j = tl.arange(0, 16)
    bits = codebook.to(tl.int16, bitcast=True).to(tl.int32)
    shift = (j % 4) * 8
    lo, hi = (bits & 0xFF) << shift, ((bits >> 8) & 0xFF) << shift
    low = (j >= first) & (j < first + 4)
    high = (j >= first + 4) & (j < first + 8)
    return (
        tl.sum(tl.where(low, lo, 0), axis=0), tl.sum(tl.where(high, lo, 0), axis=0),
        tl.sum(tl.where(low, hi, 0), axis=0), tl.sum(tl.where(high, hi, 0), axis=0),
    )  # fmt: skip


@triton.jit
def _permute_decode(words, codebook):
    """The 8 4-bit codes of each int32 word as fp16 centroids with byte permutes on the ALUs (no shuffle:
    shuffles share the L1/shared-memory pipe that bounds the kernel). For each 4 codes: `prmt` looks up
    their low and their high bytes among c[0..7] and among c[8..15] by the codes' low 3 bits; a sign-
    replicating `prmt` turns the codes' top bits into a byte mask, with which `lop3` picks between the two;
    two more `prmt` interleave the bytes into fp16 pairs. The byte planes are loop-invariant (the compiler
    hoists them). PTX, so NVIDIA GPUs only: the interpreter takes `tl.gather`."""
    n_lo0, n_lo1, n_hi0, n_hi1 = _byte_planes(codebook, 0)
    p_lo0, p_lo1, p_hi0, p_hi1 = _byte_planes(codebook, 8)
    return tl.inline_asm_elementwise(
        PERMUTE4_ASM,
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
        [words, n_lo0, n_lo1, n_hi0, n_hi1, p_lo0, p_lo1, p_hi0, p_hi1],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def load_centroids(
    codes, table, tokens, valid, BITS: tl.constexpr, DIM: tl.constexpr, PERMUTE: tl.constexpr = False
):
    """fp16 [len(tokens), DIM] centroids c[idx] of the packed rows `tokens` (rows of DIM/8·BITS bytes from
    the byte pointer `codes`, 4-byte aligned for b = 2, 4); table: `decode_table`'s register tensor.
    valid: which tokens to read (the others read as code 0, so the callers mask their scores and weights).
    PERMUTE: decode 4-bit codes with byte permutes (PTX: NVIDIA GPUs only)."""
    n: tl.constexpr = tokens.shape[0]
    if BITS == 2:  # one group per int16; each 4-bit field is two codes, looked up as one pair
        rows = codes.to(tl.pointer_type(tl.int16)) + tokens[:, None] * (DIM // 8)
        words = tl.load(rows + tl.arange(0, DIM // 8)[None, :], mask=valid[:, None], other=0).to(tl.int32)
        src = tl.broadcast_to(table[None, :], (n, 16))
        e0, e1 = _split_pairs(tl.gather(src, words & 15, axis=1))
        e2, e3 = _split_pairs(tl.gather(src, (words >> 4) & 15, axis=1))
        e4, e5 = _split_pairs(tl.gather(src, (words >> 8) & 15, axis=1))
        e6, e7 = _split_pairs(tl.gather(src, (words >> 12) & 15, axis=1))
    else:
        if BITS == 3:  # 3-byte groups: assembled from bytes (three word planes measured slower: registers)
            at = codes + tokens[:, None] * (DIM // 8 * 3) + 3 * tl.arange(0, DIM // 8)[None, :]
            words = tl.load(at, mask=valid[:, None], other=0).to(tl.int32)
            words |= tl.load(at + 1, mask=valid[:, None], other=0).to(tl.int32) << 8
            words |= tl.load(at + 2, mask=valid[:, None], other=0).to(tl.int32) << 16
        else:  # 4 bits: one group per int32 word
            rows = codes.to(tl.pointer_type(tl.int32)) + tokens[:, None] * (DIM // 8)
            words = tl.load(rows + tl.arange(0, DIM // 8)[None, :], mask=valid[:, None], other=0)
        if PERMUTE and BITS == 4:
            e0, e1, e2, e3, e4, e5, e6, e7 = _permute_decode(words, table)
        else:
            mask: tl.constexpr = (1 << BITS) - 1
            src = tl.broadcast_to(table[None, :], (n, 1 << BITS))
            e0 = tl.gather(src, words & mask, axis=1)
            e1 = tl.gather(src, (words >> BITS) & mask, axis=1)
            e2 = tl.gather(src, (words >> (2 * BITS)) & mask, axis=1)
            e3 = tl.gather(src, (words >> (3 * BITS)) & mask, axis=1)
            e4 = tl.gather(src, (words >> (4 * BITS)) & mask, axis=1)
            e5 = tl.gather(src, (words >> (5 * BITS)) & mask, axis=1)
            e6 = tl.gather(src, (words >> (6 * BITS)) & mask, axis=1)
            e7 = tl.gather(src, (words >> (7 * BITS)) & mask, axis=1)
    # Interleave the eight planes back into coordinate order: in [N, DIM/8, 2, 2, 2] the index
    # (i, j, k) is coordinate 8g + 4i + 2j + k, so the innermost join picks i and the outermost k.
    even = tl.join(tl.join(e0, e4), tl.join(e2, e6))
    odd = tl.join(tl.join(e1, e5), tl.join(e3, e7))
    return tl.reshape(tl.join(even, odd), (n, DIM))


@triton.jit
def load_signs(signs, tokens, valid, DIM: tl.constexpr):
    """±1 fp16 [len(tokens), DIM] from rows of DIM/8 bytes of sign bits (`pack_bits` at 1 bit: coordinate i
    is bit i % 8 of byte i / 8, set = +1), read as int32 words (coordinate 32w + j is bit j of word w).
    Tokens not `valid` read as all −1 (the callers mask their scores and weights)."""
    n: tl.constexpr = tokens.shape[0]
    rows = signs.to(tl.pointer_type(tl.int32)) + tokens[:, None] * (DIM // 32)
    words = tl.load(rows + tl.arange(0, DIM // 32)[None, :], mask=valid[:, None], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits.to(tl.float16) * 2 - 1, (n, DIM))
