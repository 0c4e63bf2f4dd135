"""Fused TurboQuant-MSE quantize: norm, rotation, Lloyd-Max bucketing and bit-packing in one pass (and, for
TurboQuant-Prod, `quantize_prod`: the same Stage-1 codes with the QJL sketch of the residual, below).

Per row x: ‖x‖ (stored in the norm dtype), y = Π (x / ‖x‖), idx_j = #{boundaries < y_j} exactly as
`TurboQuantMSE.encode_rotated` counts, packed eight codes per b-byte group in `pack_bits`' layout and
stored as whole words. Two products:
- Π = D₂ H D₁ / √d (fast Hadamard: √d · Π has entries ±1) with bf16/fp16 input: one tensor-core product of
  x in its own dtype with the ±1 matrix, exact term by term, accumulated in fp32, then scaled by 1/(√d ‖x‖).
  At d = 256 the matrix is [[A₀, A₁], [r₀ ⊙ A₀, r₁ ⊙ A₁]] (H₂₅₆ = H₂ ⊗ H₁₂₈; r the lower rows' signs), so
  y = [P₀ + P₁, r₀ ⊙ P₀ + r₁ ⊙ P₁] with P_j = A_j x_j: two products of half the width, half the work;
- any other Π (`rotation.matrix()`), or fp32 input: tiles of x/‖x‖ times Π in "tf32x3" (three TF32
  products, ~2^-22 relative error per term).
With a codebook symmetric about 0 (Lloyd-Max's are), the count runs over the positive half on |y|. Centered
codes (`Centered`: of x − μ) take the same products: x − μ is formed in fp32 for the norm, and the ±1
product's output less (√d Π) μ (precomputed) is that of x − μ, so bf16/fp16 input keeps the exact product.
The output tensors are those of `TurboQuantMSE.quantize`: the indices agree bit for bit except where y_j
lies within float32 round-off of a boundary (the sums run in another order than the reference matmul), and
the fp16 norms agree except where ‖x‖ rounds to fp16 within an fp32 ulp of a tie. Tables built with
`sign_magnitude=True` (4 bits, symmetric codebook: the cache's) write those indices as sign-magnitude labels
instead (`packed.sign_magnitude` maps them back).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from ..quant.codes import check_norm_dtype
from .packed import MAX_BITS
from .step import BLOCK_DIM, MIN_ROWS, _rounded, step_end
from .step import prepare as prepare_step_end

BLOCK_ROWS = 64
# quantize_prod per head_dim: rows per program (its S r accumulator holds d fp32 per row) and rotation output
# columns per step (each step multiplies by an fp32 [step, d] tile of Sᵀ); four warps. Measured on an H200
# (tools/research/gpu_prod_quantize_tuning.py): at d = 256, 32 rows and 64 columns spill, 15× slower.
SKETCH_SHAPE = {64: (32, 64), 128: (32, 64), 256: (16, 32)}
SKETCH_WARPS = 4
TF32_TILE = 32  # square tiles of a general rotation: larger ones spill registers with tf32x3 on sm_90
FLOAT32_MAX = torch.finfo(torch.float32).max  # the default norm_limit: only inf (and NaN) flag a norm
SIGN_TILE = 128  # output columns per ±1 product (measured on an H200: wider spills at d = 256)
HALVES_TILE = 64  # output columns of each half per step of the signed-halves product (fewer live registers)
SIGN_WARPS = 4  # warps per program of the ±1 product (tools/research/gpu_quantize_tuning.py)
TF32_WARPS = 8  # warps per program of the tf32x3 product
INTERPRETER_TILE = 256  # Triton's interpreter costs per operation, not per element: one tile of the rotation


@dataclasses.dataclass(frozen=True)
class QuantizeTables:
    """What the kernel reads for one codec (or one per KV head), built once by `quantize_tables`."""

    matrix: torch.Tensor  # [(H,) d, d]: √d · Π in the input dtype when `signs`, else Π in fp32
    boundaries: torch.Tensor  # fp32 [2^bits − 1]
    signs: bool  # Π = (±1 matrix) / √d: the exact low-precision product applies
    symmetric: bool  # boundaries = −reversed(boundaries)
    row_signs: torch.Tensor | None = None  # fp32 [(H,) 2, d/2]: r₀, r₁ when the ±1 matrix has signed halves
    sketch_t: torch.Tensor | None = None  # Prod: Sᵀ, fp32 [(H,) d, d] (the QJL projections transposed)
    centroids: torch.Tensor | None = None  # Prod: the Stage-1 codebook, fp32 [2^bits]
    mean: torch.Tensor | None = None  # centered codes (of x − μ): μ, fp32 [(H,) d]
    signed_mean: torch.Tensor | None = (
        None  # with `signs`: (√d · Π) μ, fp32 [(H,) d], subtracted from (√d · Π) x
    )
    sign_magnitude: bool = False  # 4-bit codes written as sign-magnitude labels (`packed.sign_magnitude`)


def signed_halves(signs: torch.Tensor) -> torch.Tensor | None:
    """[(H,) 2, d/2] row signs r_j when the ±1 matrix [(H,) d, d] is [[A₀, A₁], [r₀ ⊙ A₀, r₁ ⊙ A₁]]
    (each lower block's rows are the upper block's, signed), else None. D₂ (H₂ ⊗ H_{d/2}) D₁ always is."""
    half = signs.shape[-1] // 2
    blocks = signs.unflatten(-1, (2, half)).unflatten(-3, (2, half))  # [..., i, row, j, col]
    top, bottom = blocks[..., 0, :, :, :], blocks[..., 1, :, :, :]
    rows = bottom[..., 0] * top[..., 0]  # [..., row, j]
    if not torch.equal(bottom, rows[..., None] * top):
        return None
    return rows.transpose(-1, -2).float().contiguous()


def quantize_tables(
    rotation: torch.Tensor,
    boundaries: torch.Tensor,
    dtype: torch.dtype,
    projection: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    sign_magnitude: bool = False,
) -> QuantizeTables:
    """Inspect Π and the boundaries once (this reads them back from the GPU): per-call use would stall it.
    For `quantize_prod`, also the QJL projections S ([(H,) d, d], `codec.projection`) and the Stage-1
    centroids (`codec.mse.centroids`). mean: μ ([(H,) d], `Centered.mean`) for codes of x − μ.
    sign_magnitude: write 4-bit MSE codes of a symmetric codebook as `packed.sign_magnitude` labels, which the
    decode kernels read with a table from `centroid_table(..., sign_magnitude=True)` in fewer instructions."""
    scaled = rotation.double() * math.sqrt(rotation.shape[-1])
    # 1/√d is inexact in fp32 unless d is a power of 4, so the entries are ±1 only up to round-off
    signs = dtype in (torch.bfloat16, torch.float16) and bool(((scaled.abs() - 1).abs() < 1e-5).all())
    b = boundaries.float().contiguous()
    symmetric = bool(torch.equal(b, -b.flip(0)))
    if sign_magnitude and (b.numel() != 15 or not symmetric or projection is not None):
        raise ValueError(
            "sign_magnitude labels are for TurboQuant-MSE codes of 4 bits with a codebook symmetric about 0; "
            f"these are {b.numel()} boundaries ({'' if symmetric else 'not '}symmetric)"
            + (" of Prod's Stage 1" if projection is not None else "")
        )
    halves = signs and rotation.shape[-1] == 2 * SIGN_TILE
    return QuantizeTables(
        scaled.round().to(dtype).contiguous() if signs else rotation.float().contiguous(),
        b,
        signs,
        symmetric,
        signed_halves(scaled.round()) if halves else None,
        None if projection is None else projection.float().transpose(-1, -2).contiguous(),
        None if centroids is None else centroids.float().contiguous(),
        None if mean is None else mean.float().contiguous(),
        # exact ±1 products of x, less the mean's (formed in fp64): the one-product path serves centered codes
        (scaled.round() @ mean.double()[..., None])[..., 0].float().contiguous()
        if signs and mean is not None
        else None,
        sign_magnitude,
    )


@triton.jit
def _count(
    y, boundaries, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, SEARCH: tl.constexpr = False,
    SIGN_MAGNITUDE: tl.constexpr = False,
):  # fmt: skip
    """#{boundaries < y} per element (int32). SEARCH: at 4 and 3 bits, a binary search over the 7 or 3
    positive boundaries (3 comparisons, not 7; 2, not 3; where it pays, see `_quantize_rows`).
    SIGN_MAGNITUDE (4 bits, symmetric): the count's sign-magnitude label (`packed.sign_magnitude`)."""
    if SYMMETRIC and BITS == 4 and SEARCH and SIGN_MAGNITUDE:  # 7 − count from the complementary comparisons
        a, b = tl.abs(y), boundaries + 8
        n0 = a <= tl.load(b + 3)
        n1 = a <= tl.where(n0, tl.load(b + 1), tl.load(b + 5))
        n2 = a <= tl.where(
            n0, tl.where(n1, tl.load(b), tl.load(b + 2)), tl.where(n1, tl.load(b + 4), tl.load(b + 6))
        )
        below = n0.to(tl.int32) * 4 + n1.to(tl.int32) * 2 + n2.to(tl.int32)
        return tl.where(y > 0, 8 + below, below)
    if SYMMETRIC and BITS == 4 and SEARCH:
        a, b = tl.abs(y), boundaries + 8
        c0 = a > tl.load(b + 3)
        c1 = a > tl.where(c0, tl.load(b + 5), tl.load(b + 1))
        c2 = a > tl.where(
            c0, tl.where(c1, tl.load(b + 6), tl.load(b + 4)), tl.where(c1, tl.load(b + 2), tl.load(b))
        )
        above = c0.to(tl.int32) * 4 + c1.to(tl.int32) * 2 + c2.to(tl.int32)
        return tl.where(y > 0, 8 + above, 7 - above)
    if SYMMETRIC and BITS == 3 and SEARCH:  # the 3 positive boundaries in 2 comparisons
        a, b = tl.abs(y), boundaries + 4
        c0 = a > tl.load(b + 1)
        c1 = a > tl.where(c0, tl.load(b + 2), tl.load(b))
        above = c0.to(tl.int32) * 2 + c1.to(tl.int32)
        return tl.where(y > 0, 4 + above, 3 - above)
    if SYMMETRIC:  # the middle boundary is 0; count the positive ones below |y|
        half: tl.constexpr = 1 << (BITS - 1)
        above = tl.zeros(y.shape, tl.int32)
        for k in tl.static_range(half - 1):
            above += (tl.abs(y) > tl.load(boundaries + half + k)).to(tl.int32)
        return tl.where(y > 0, 2 * half - 1 - above if SIGN_MAGNITUDE else half + above, half - 1 - above)
    idx = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range((1 << BITS) - 1):
        idx += (y > tl.load(boundaries + k)).to(tl.int32)
    return idx


@triton.jit
def _column_order(first, N: tl.constexpr, PERMUTED: tl.constexpr):
    """The coordinates of a product step's N output columns, from `first`: in order or, PERMUTED (N >= 32),
    column 8k + 2t + e takes coordinate first + (N/4) t + 2k + e. A tensor-core accumulator gives lane t of
    each quad the columns 8k + 2t + {0, 1}, so each lane then holds N/4 consecutive coordinates, whole groups
    of eight, and packs them in its own registers."""
    j = tl.arange(0, N)
    if PERMUTED and N >= 32:
        return first + (N // 4) * ((j % 8) // 2) + 2 * (j // 8) + (j % 2)
    return first + j


@triton.jit
def _groups(idx, BITS: tl.constexpr, PERMUTED: tl.constexpr):
    """[rows, N/8] words of eight BITS-wide codes each, in group order, from codes idx [rows, N] in
    `_column_order`. Eight codes of a group have disjoint bits, so their shifted sum is their bitwise or."""
    rows: tl.constexpr = idx.shape[0]
    n: tl.constexpr = idx.shape[1]
    if PERMUTED and n >= 32:  # columns (kh, kl, t, e): coordinate (n/4) t + 8 kh + 2 kl + e
        kl, e = tl.arange(0, 4), tl.arange(0, 2)
        shifts = (2 * kl[:, None] + e[None, :]) * BITS
        parts = tl.reshape(idx, (rows, n // 32, 4, 4, 2)) << shifts[None, None, :, None, :]
        groups = tl.sum(tl.sum(parts, axis=4), axis=2)  # [rows, kh, t]: group (n/32) t + kh
        return tl.reshape(tl.permute(groups, (0, 2, 1)), (rows, n // 8))
    shifts = tl.arange(0, 8) * BITS
    return tl.sum(tl.reshape(idx, (rows, n // 8, 8)) << shifts[None, None, :], axis=2)


@triton.jit
def _store_codes(
    codes, row, valid, idx, col, DIM: tl.constexpr, BITS: tl.constexpr, COLS: tl.constexpr,
    PERMUTED: tl.constexpr = False,
):  # fmt: skip
    """Pack idx [rows, COLS] (coordinates col..col + COLS in `_column_order`) into pack_bits' layout and
    store whole words."""
    rows: tl.constexpr = idx.shape[0]
    groups = _groups(idx, BITS, PERMUTED)
    g = col // 8 + tl.arange(0, COLS // 8)
    row = row.to(tl.int64)[:, None]
    if BITS == 4:  # one group per int32
        tl.store(
            codes.to(tl.pointer_type(tl.int32)) + row * (DIM // 8) + g[None, :], groups, mask=valid[:, None]
        )
    elif BITS == 2:  # one group per int16
        at = codes.to(tl.pointer_type(tl.int16)) + row * (DIM // 8) + g[None, :]
        tl.store(at, groups.to(tl.int16), mask=valid[:, None])
    elif BITS == 3 and COLS % 32 == 0:  # four 24-bit groups per three int32 words
        quads = tl.reshape(groups, (rows, COLS // 32, 2, 2))  # (q, i, j): group 4q + 2i + j
        even, odd = tl.split(quads)  # j = 0: groups 4q, 4q + 2; j = 1: 4q + 1, 4q + 3
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
        at = (
            codes.to(tl.pointer_type(tl.int32))
            + row * (DIM // 32 * 3)
            + 3 * (col // 32 + tl.arange(0, COLS // 32))[None, :]
        )
        tl.store(at, g0 | (g1 << 24), mask=valid[:, None])
        tl.store(at + 1, ((g1 >> 8) & 0xFFFF) | (g2 << 16), mask=valid[:, None])
        tl.store(at + 2, ((g2 >> 16) & 0xFF) | (g3 << 8), mask=valid[:, None])
    else:
        at = codes + row * (DIM // 8 * BITS) + g[None, :] * BITS
        for byte in tl.static_range(BITS):
            tl.store(at + byte, ((groups >> (8 * byte)) & 0xFF).to(tl.uint8), mask=valid[:, None])


@triton.jit
def _sign_product(xs, xf, signs_t, F32_DOT: tl.constexpr):
    """xs · signs_t in fp32 (xf: xs in fp32)."""
    if F32_DOT:  # Triton's interpreter mishandles bf16 products; ±1 products are exact either way
        return tl.dot(xf, signs_t.to(tl.float32), input_precision="ieee")
    return tl.dot(xs, signs_t)


@triton.jit
def _centered(xf, mean, coords, CENTERED: tl.constexpr):
    """xf − μ[coords] in fp32 (as `Centered.quantize` forms it) when CENTERED, else xf."""
    if CENTERED:
        return xf - tl.load(mean + coords)[None, :]
    return xf


@triton.jit
def _less_mean(product, signed_mean, coords, CENTERED: tl.constexpr):
    """A ±1 product's output columns `coords` of x, made those of x − μ: less (√d Π μ)[coords]."""
    if CENTERED:
        return product - tl.load(signed_mean + coords)[None, :]
    return product


@triton.jit
def _sketch_step(
    sketched, squares, y, idx, centroids, sketch_t, coords, DIM: tl.constexpr, PRECISION: tl.constexpr
):
    """Prod's residual r = y − c[idx] of the output columns at coordinates `coords` (y [rows, cols],
    unit-scaled): ‖r‖² and S r accumulated, S r += r · Sᵀ[coords, :] (sketch_t: Sᵀ, [DIM, DIM] fp32)."""
    r = y - tl.load(centroids + idx)
    s_t = tl.load(sketch_t + coords[:, None] * DIM + tl.arange(0, DIM)[None, :])
    return sketched + tl.dot(r, s_t, input_precision=PRECISION), squares + tl.sum(r * r, axis=1)


@triton.jit
def _quantize_rows(
    x, matrix, boundaries, codes, norms, row_signs, rows, x_stride_g, x_stride_t, rotations, inv_sqrt_d,
    centroids, sketch_t, sketch_signs, residual_norms, mean, signed_mean, out_rows, at, overflow, norm_limit,
    DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, COLS: tl.constexpr,
    SIGNS: tl.constexpr, HALVES: tl.constexpr, OUT_COLS: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    F32_DOT: tl.constexpr, SKETCH: tl.constexpr, PERMUTED: tl.constexpr, CENTERED: tl.constexpr, AT: tl.constexpr,
    OVERFLOW: tl.constexpr, SIGN_MAGNITUDE: tl.constexpr,
    x2=None, matrix2=None, boundaries2=None, codes2=None, norms2=None, row_signs2=None, x_stride_g2=0,
    x_stride_t2=0, centroids2=None, sketch_t2=None, sketch_signs2=None, residual_norms2=None, mean2=None,
    signed_mean2=None, out_rows2=0, overflow2=None, norm_limit2=0.0, PAIR: tl.constexpr = False,
    query=None, q_rotations=None, q_rotated=None, Q_KV_HEADS: tl.constexpr = 1, Q_GROUP: tl.constexpr = 1,
    Q_ROWS: tl.constexpr = MIN_ROWS, Q_BLOCK: tl.constexpr = BLOCK_DIM, START: tl.constexpr = False,
):  # fmt: skip
    tl.static_assert(PAIR or not START, "START rotates queries beside a paired key and value quantize")
    if START:  # with PAIR, a decode step's start in one launch: plane 2 rotates the step's queries
        if tl.program_id(2) == 2:
            if tl.program_id(0) * Q_BLOCK >= DIM:  # the grid may be wider than the rotation needs
                return
            step_end(
                tl.program_id(1), tl.program_id(0), query, query, q_rotations, query, query, query, q_rotated,
                0.0, Q_KV_HEADS, Q_GROUP, Q_ROWS, DIM, Q_BLOCK, True, False,
            )  # fmt: skip
            return
        if tl.program_id(0) * BLOCK_ROWS >= rows:  # the grid may be wider than the quantize needs
            return
    if PAIR:  # two calls of the same shape and settings in one launch (a step's keys and values): grid axis 2
        if tl.program_id(2) == 1:
            x, matrix, boundaries, codes, norms = x2, matrix2, boundaries2, codes2, norms2
            x_stride_g, x_stride_t, out_rows = x_stride_g2, x_stride_t2, out_rows2
            if HALVES:
                row_signs = row_signs2
            if SKETCH:
                centroids, sketch_t, sketch_signs, residual_norms = (
                    centroids2, sketch_t2, sketch_signs2, residual_norms2
                )  # fmt: skip
            if CENTERED:
                mean, signed_mean = mean2, signed_mean2
            if OVERFLOW:
                overflow, norm_limit = overflow2, norm_limit2
    g = tl.program_id(1).to(tl.int64)  # a group of rows that share one rotation (a KV head)
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = row < rows
    x_rows = x + g * x_stride_g + row.to(tl.int64)[:, None] * x_stride_t
    matrix += (g % rotations) * DIM * DIM
    head = (g % rotations) * DIM  # CENTERED: codes of x − μ, this head's μ and (√d Π) μ start at `head`
    if AT:  # into a longer store, from a token position held on the device (a CUDA graph replays it)
        row += tl.load(at)
        stored = valid & (row >= 0) & (row < out_rows)  # a position past either end writes nothing
    else:
        stored = valid
    row = g * out_rows + row  # the output's row: out_rows per group
    # Prod (SKETCH): S r and ‖r‖² of each row's residual, accumulated over the output columns
    if SKETCH:
        sketch_t += (g % rotations) * DIM * DIM
    sketched = tl.zeros((BLOCK_ROWS, DIM if SKETCH else 16), tl.float32)
    r_squares = tl.zeros((BLOCK_ROWS,), tl.float32)
    if HALVES:  # DIM = 2 COLS, √d Π = [[A₀, A₁], [r₀ ⊙ A₀, r₁ ⊙ A₁]]
        part = tl.arange(0, COLS)
        xs0 = tl.load(x_rows + part[None, :], mask=valid[:, None], other=0.0)
        xs1 = tl.load(x_rows + COLS + part[None, :], mask=valid[:, None], other=0.0)
        xf0, xf1 = xs0.to(tl.float32), xs1.to(tl.float32)
        c0, c1 = (
            _centered(xf0, mean, head + part, CENTERED),
            _centered(xf1, mean, head + COLS + part, CENTERED),
        )
        norm = tl.sqrt(tl.sum(c0 * c0, axis=1) + tl.sum(c1 * c1, axis=1))
        scale = inv_sqrt_d / tl.maximum(norm, 1.1754943508222875e-38)
        row_signs += (g % rotations) * DIM
        for first in tl.static_range(0, COLS, OUT_COLS):  # output columns of both halves at a time
            out = _column_order(first, OUT_COLS, PERMUTED)
            # P_j = x_j A_jᵀ: A_jᵀ[k, c] = √d Π[c, j COLS + k]
            p0 = _sign_product(xs0, xf0, tl.load(matrix + out[None, :] * DIM + part[:, None]), F32_DOT)
            a1_t = tl.load(matrix + out[None, :] * DIM + (COLS + part)[:, None])
            p1 = _sign_product(xs1, xf1, a1_t, F32_DOT)
            y = (_less_mean(p0 + p1, signed_mean, head + out, CENTERED)) * scale[
                :, None
            ]  # the upper rows of √d Π
            # SEARCH with permuted columns: 50 → 53 % (3 bits), 46 → 55 % (4 bits) of a copy
            idx = _count(y, boundaries, BITS, SYMMETRIC, True, SIGN_MAGNITUDE)
            _store_codes(codes, row, stored, idx, first, DIM, BITS, OUT_COLS, PERMUTED)
            if SKETCH:
                sketched, r_squares = _sketch_step(
                    sketched, r_squares, y, idx, centroids, sketch_t, out, DIM, PRECISION
                )
            r0, r1 = tl.load(row_signs + out), tl.load(row_signs + COLS + out)
            y = (
                _less_mean(p0 * r0[None, :] + p1 * r1[None, :], signed_mean, head + COLS + out, CENTERED)
                * scale[:, None]
            )
            idx = _count(y, boundaries, BITS, SYMMETRIC, True, SIGN_MAGNITUDE)
            _store_codes(codes, row, stored, idx, COLS + first, DIM, BITS, OUT_COLS, PERMUTED)
            if SKETCH:
                sketched, r_squares = _sketch_step(
                    sketched, r_squares, y, idx, centroids, sketch_t, COLS + out, DIM, PRECISION
                )
    elif SIGNS:
        dims = tl.arange(0, DIM)
        xs = tl.load(x_rows + dims[None, :], mask=valid[:, None], other=0.0)
        xf = xs.to(tl.float32)
        c = _centered(xf, mean, head + dims, CENTERED)
        norm = tl.sqrt(tl.sum(c * c, axis=1))
        scale = inv_sqrt_d / tl.maximum(norm, 1.1754943508222875e-38)  # clamp_min(finfo(float32).tiny)
        for col in tl.static_range(0, DIM, COLS):
            coords = _column_order(col, COLS, PERMUTED)
            signs_t = tl.load(matrix + coords[None, :] * DIM + dims[:, None])  # √d Πᵀ[:, coords]
            y = (
                _less_mean(_sign_product(xs, xf, signs_t, F32_DOT), signed_mean, head + coords, CENTERED)
                * scale[:, None]
            )
            # SEARCH at 4 bits: 55 → 66 % (d = 64), 51 → 63 % (d = 128) of a copy; at 3 bits 1–3 points slower
            idx = _count(y, boundaries, BITS, SYMMETRIC, BITS == 4, SIGN_MAGNITUDE)
            _store_codes(codes, row, stored, idx, col, DIM, BITS, COLS, PERMUTED)
            if SKETCH:
                sketched, r_squares = _sketch_step(
                    sketched, r_squares, y, idx, centroids, sketch_t, coords, DIM, PRECISION
                )
    else:
        # Tiles of COLS along both axes keep the product's operands in registers at d = 256 (a whole
        # row block and rotation would spill); x is read once from HBM and re-read from cache per tile.
        part = tl.arange(0, COLS)
        squares = tl.zeros((BLOCK_ROWS,), tl.float32)
        for first in range(0, DIM, COLS):
            v = tl.load(x_rows + first + part[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            v = _centered(v, mean, head + first + part, CENTERED)
            squares += tl.sum(v * v, axis=1)
        norm = tl.sqrt(squares)
        inv_norm = 1.0 / tl.maximum(norm, 1.1754943508222875e-38)
        for col in range(0, DIM, COLS):
            y = tl.zeros((BLOCK_ROWS, COLS), tl.float32)
            for first in range(0, DIM, COLS):
                v = tl.load(x_rows + first + part[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                v = _centered(v, mean, head + first + part, CENTERED)
                # Πᵀ[first:, col:] so that y = unit · Πᵀ, as Rotation.apply(x) = x @ Π.T
                rotation_t = tl.load(matrix + (col + part)[None, :] * DIM + (first + part)[:, None])
                y += tl.dot(v * inv_norm[:, None], rotation_t, input_precision=PRECISION)
            idx = _count(y, boundaries, BITS, SYMMETRIC, False, SIGN_MAGNITUDE)
            _store_codes(codes, row, stored, idx, col, DIM, BITS, COLS)
            if SKETCH:
                sketched, r_squares = _sketch_step(
                    sketched, r_squares, y, idx, centroids, sketch_t, col + part, DIM, PRECISION
                )
    tl.store(norms + row, _rounded(norm, norms), mask=stored)
    if OVERFLOW:  # a norm stored as inf (or NaN, from a non-finite x): flagged on the device, no sync
        kept = norm.to(norms.dtype.element_ty).to(tl.float32)
        bad = stored & ((kept != kept) | (tl.abs(kept) > norm_limit))  # NaN, or past the limit (inf is)
        tl.store(overflow + tl.zeros_like(row), tl.full(row.shape, 1, tl.int32), mask=bad)  # no reduction
    if SKETCH:  # sign bits of S r (set: >= 0), one bit per coordinate in pack_bits' layout, and ‖r‖
        _store_codes(sketch_signs, row, stored, (sketched >= 0).to(tl.int32), 0, DIM, 1, DIM)
        tl.store(residual_norms + row, _rounded(tl.sqrt(r_squares), residual_norms), mask=stored)


def _permuted_columns(bits: int, halves: bool, sketch: bool) -> bool:
    """Whether the ±1 products take their output columns in `_column_order`'s permuted order. Measured on an
    H200 against the natural order (docs/benchmarks.md, "Permuted output columns"): faster at 2 bits (+2 to
    +12 points of a copy) and in the signed halves at d = 256 (4 bits: 41 → 46 %), slower at 4 bits at
    d = 64 and 128 (−8 to −10 points) and for Prod."""
    return not sketch and (bits == 2 or halves)


def quantize_mse(
    x: torch.Tensor,
    rotation: torch.Tensor,
    boundaries: torch.Tensor,
    norm_dtype: torch.dtype = torch.float16,
    tables: QuantizeTables | None = None,
    mean: torch.Tensor | None = None,
    into: tuple[torch.Tensor, ...] | None = None,
    at: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    launch: bool = True,
    norm_limit: float = FLOAT32_MAX,
) -> tuple[torch.Tensor, torch.Tensor] | QuantizeLaunch:
    """x [..., d] → (indices uint8 [..., packed_row_bytes(d, bits)], norms [...] in norm_dtype): the
    tensors of `TurboQuantMSE.quantize`. rotation: Π as [d, d] (`codec.rotation.matrix()`, built once), or
    one per KV head, [H, d, d], for x [..., H, T, d] (head h coded by codec h, as the cache does);
    boundaries: `codec.boundaries` (2^bits − 1 of them). tables: `quantize_tables(rotation, boundaries,
    x.dtype, mean=mean)`, built once by a caller on the hot path (otherwise each call builds it, reading Π
    back). mean: μ, [d] or one per KV head, [H, d]: the codes of x − μ (those of `Centered(codec, μ)`),
    formed in fp32 in the kernel; with the exact ±1 product, as (√d Π) x − (√d Π) μ. into, at: write the
    codes of x [..., T, d] into these tensors (a cache's storage, [..., capacity, bytes] and [..., capacity],
    returned) from token `at` on (an int32 or int64 tensor of one element on x's device, read by the kernel,
    so a CUDA graph replays the write at a count that moves); at + T should not exceed the capacity, which is
    not checked on the host (that would stall the stream): rows that would land before token 0 or past the
    capacity are not written, so a wrong `at` never writes outside these tensors. Unlike the codec it does not raise for norms that overflow norm_dtype (they
    come back inf, and a non-finite x's NaN), since reading that back would stall the GPU stream on every call:
    overflow, an int32 tensor of one element on x's device, is set to 1 where one does, or where a stored
    norm exceeds norm_limit (the cache gives values fp16's 65 504: the decode kernels take p·‖v‖ as an fp16
    operand), and left as it is otherwise, for the caller to read when it syncs anyway
    (`TurboQuantCache.check_norms`). launch=False: the checked call as a `QuantizeLaunch`, for `run_together`."""
    tables = tables or quantize_tables(rotation, boundaries, x.dtype, mean=mean)
    call = _quantize(x, rotation, boundaries, norm_dtype, tables, mean, into, at, overflow, norm_limit, False)
    return call.run() if launch else call


def quantize_prod(
    x: torch.Tensor,
    rotation: torch.Tensor,
    boundaries: torch.Tensor,
    projection: torch.Tensor,
    centroids: torch.Tensor,
    norm_dtype: torch.dtype = torch.float16,
    tables: QuantizeTables | None = None,
    mean: torch.Tensor | None = None,
    into: tuple[torch.Tensor, ...] | None = None,
    at: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    launch: bool = True,
    norm_limit: float = FLOAT32_MAX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | QuantizeLaunch:
    """x [..., d] → (indices, signs, norms, residual_norms): the tensors of `TurboQuantProd.quantize` (its
    `ProdCode` fields), in the same pass: the Stage-1 codes as `quantize_mse` (rotation and boundaries of
    `codec.mse`), then the residual r = Πu − c[idx] in registers, the sign bits of S r (projection:
    `codec.projection`, [d, d] or one per KV head, [H, d, d]; qjl_dim = d only) and ‖r‖. S r is summed in
    tf32x3 on a GPU: a sign may differ from the codec's where |S r| is within round-off of 0.
    centroids: `codec.mse.centroids`. tables: `quantize_tables(rotation, boundaries, x.dtype, projection,
    centroids, mean)`, built once on the hot path. mean, into (the four tensors), at, overflow, launch,
    norm_limit: as in `quantize_mse`."""
    dim = x.shape[-1]
    if tuple(projection.shape) != tuple(rotation.shape):
        raise ValueError(
            f"projection has shape {tuple(projection.shape)}; the kernel takes qjl_dim = head_dim, one "
            f"[{dim}, {dim}] projection per rotation ({tuple(rotation.shape)})"
        )
    tables = tables or quantize_tables(rotation, boundaries, x.dtype, projection, centroids, mean)
    if (
        tables.sketch_t is None
        or tables.centroids is None
        or tables.centroids.numel() != boundaries.numel() + 1
    ):
        raise ValueError(
            "tables lack Prod's projection or its centroids: quantize_tables(..., projection, centroids)"
        )
    devices = {tables.sketch_t.device, tables.centroids.device}
    if tables.sketch_t.shape != rotation.shape or devices != {x.device}:
        raise ValueError(
            f"tables hold a {tuple(tables.sketch_t.shape)} projection on {tables.sketch_t.device}; x needs one per "
            f"rotation ({tuple(rotation.shape)}) on {x.device}: quantize_tables(..., projection, centroids)"
        )
    call = _quantize(x, rotation, boundaries, norm_dtype, tables, mean, into, at, overflow, norm_limit, True)
    return call.run() if launch else call


def _quantize(
    x,
    rotation,
    boundaries,
    norm_dtype,
    tables: QuantizeTables,
    mean,
    into,
    at,
    overflow,
    norm_limit,
    sketch: bool,
):
    dim = x.shape[-1]
    bits = boundaries.numel().bit_length()
    if boundaries.numel() != (1 << bits) - 1 or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{boundaries.numel()} boundaries are not 2^bits − 1 with bits in 1..{MAX_BITS}")
    per_head = rotation.dim() == 3
    if (
        dim < 16
        or dim & (dim - 1)
        or tuple(rotation.shape[-2:]) != (dim, dim)
        or rotation.dim() not in (2, 3)
    ):
        raise ValueError(
            f"x of dim {dim} (a power of two >= 16) needs a [{dim}, {dim}] rotation (or [H, {dim}, {dim}]), "
            f"got {tuple(rotation.shape)}"
        )
    if per_head and (x.dim() < 3 or x.shape[-3] != rotation.shape[0]):
        raise ValueError(
            f"{rotation.shape[0]} per-head rotations need x of shape [..., {rotation.shape[0]}, T, {dim}], "
            f"got {tuple(x.shape)}"
        )
    if not x.is_floating_point() or {
        rotation.device,
        boundaries.device,
        getattr(mean, "device", x.device),
    } != {x.device}:
        raise ValueError(
            f"x ({x.dtype}, {x.device}), rotation, boundaries and mean must be floating tensors on one device"
        )
    if tables.matrix.device != x.device:
        raise ValueError(
            f"tables are on {tables.matrix.device}, x on {x.device}: quantize_tables(...) on x's device"
        )
    check_norm_dtype(norm_dtype, "quantize")
    if tables.signs and tables.matrix.dtype != x.dtype:
        raise ValueError(f"tables were built for {tables.matrix.dtype} input, x is {x.dtype}")
    if tables.matrix.shape != rotation.shape or tables.boundaries.numel() != boundaries.numel():
        raise ValueError(
            f"tables were built for a {tuple(tables.matrix.shape)} rotation and {tables.boundaries.numel()} "
            f"boundaries, not these ({tuple(rotation.shape)}, {boundaries.numel()}): quantize_tables(rotation, "
            "boundaries, x.dtype)"
        )
    if (mean is None) != (tables.mean is None) or (
        mean is not None and (mean.shape != rotation.shape[:-1] or tables.mean.shape != mean.shape)
    ):
        raise ValueError(
            f"mean has shape {None if mean is None else tuple(mean.shape)} and the tables' "
            f"{None if tables.mean is None else tuple(tables.mean.shape)}; centered codes need both, of shape "
            f"{tuple(rotation.shape[:-1])} (one per rotation): quantize_tables(..., mean=mean)"
        )
    shapes = {"indices": (dim // 8 * bits,), "signs": (dim // 8,), "norms": (), "residual_norms": ()}
    if not sketch:
        del shapes["signs"], shapes["residual_norms"]
    if into is not None:
        out_rows = _check_into(x, into, at, shapes, norm_dtype)
    elif at is not None:
        raise ValueError("at is where x's codes go in `into`: pass both or neither")
    if overflow is not None and (
        overflow.dtype != torch.int32 or overflow.numel() != 1 or overflow.device != x.device
    ):
        raise ValueError(
            f"overflow is a {overflow.dtype} tensor of {overflow.numel()} elements on {overflow.device}; "
            f"expected an int32 tensor of one element on {x.device}"
        )
    # [groups, rows, d]: a group per rotation, or per token run of a store written into
    rows = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], dim) if per_head or into else x.reshape(1, -1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if into is None:
        out_rows = rows.shape[1]
        into = [
            torch.empty((*x.shape[:-1], *shape), dtype=torch.uint8 if shape else norm_dtype, device=x.device)
            for shape in shapes.values()
        ]
    out = dict(zip(shapes, into, strict=True))  # by field name: indices, (signs,) norms, (residual_norms)
    halves = (
        tables.signs and tables.row_signs is not None and dim == 2 * SIGN_TILE
    )  # the kernel's COLS = d / 2
    # the product's output columns per step (a half's at d = 256); Prod's fewer: each step multiplies S too
    sketch_rows, sketch_step = SKETCH_SHAPE.get(dim, (16, 32))
    sketch_step = sketch_step if sketch and x.is_cuda else None
    step = sketch_step or HALVES_TILE  # read under HALVES only
    if halves:
        tile = SIGN_TILE
    elif tables.signs:
        tile = min(dim, sketch_step or SIGN_TILE)
    else:
        tile = min(dim, TF32_TILE if x.is_cuda else INTERPRETER_TILE)
    block_rows = sketch_rows if sketch else BLOCK_ROWS
    return QuantizeLaunch(
        grid=(triton.cdiv(rows.shape[1], block_rows), rows.shape[0]),
        shared=dict(rows=rows.shape[1], rotations=rotation.shape[0] if per_head else 1, inv_sqrt_d=dim**-0.5, at=at),
        own=dict(
            x=rows, matrix=tables.matrix, boundaries=tables.boundaries, codes=out["indices"], norms=out["norms"],
            row_signs=tables.row_signs, x_stride_g=rows.stride(0), x_stride_t=rows.stride(1),
            centroids=tables.centroids, sketch_t=tables.sketch_t, sketch_signs=out.get("signs"),
            residual_norms=out.get("residual_norms"), mean=tables.mean, signed_mean=tables.signed_mean,
            out_rows=out_rows, overflow=overflow, norm_limit=norm_limit,
        ),
        meta=dict(
            DIM=dim, BITS=bits, BLOCK_ROWS=block_rows, COLS=tile,
            SIGNS=tables.signs, HALVES=halves, OUT_COLS=step, SYMMETRIC=tables.symmetric,
            PRECISION="tf32x3" if x.is_cuda else "ieee", F32_DOT=not x.is_cuda, SKETCH=sketch,
            PERMUTED=_permuted_columns(bits, halves, sketch), CENTERED=mean is not None, AT=at is not None,
            OVERFLOW=overflow is not None, SIGN_MAGNITUDE=tables.sign_magnitude,
            num_warps=SKETCH_WARPS if sketch else SIGN_WARPS if tables.signs else TF32_WARPS, num_stages=1,
        ),
        outputs=tuple(into),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantizeLaunch:
    """One checked quantize call, not yet launched (`quantize_mse(..., launch=False)`): `run()` launches it,
    `run_together` launches several."""

    grid: tuple[int, int]
    shared: dict  # the kernel's arguments that two paired calls must share
    own: dict  # its arguments that are each call's own (a second call's take the suffix 2)
    meta: dict  # its compile-time settings and launch options
    outputs: tuple  # the tensors the codes are written into, as quantize_mse / quantize_prod return them

    def run(self) -> tuple:
        _quantize_rows[self.grid](**self.shared, **self.own, **self.meta)
        return self.outputs


def _kind(value):
    """What the compiled kernel's type for an argument depends on: a tensor's dtype, None, or for an int
    whether Triton makes it the constant 1 (the second call's arguments replace the first's inside one
    compiled kernel, so each pair must compile to one type)."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    return value if value is None else value == 1


def _pairable(a: QuantizeLaunch, b: QuantizeLaunch) -> bool:
    same = a.grid == b.grid and a.meta == b.meta
    return (
        same
        and all(
            (a.shared[k] is b.shared[k])
            if isinstance(a.shared[k], torch.Tensor)
            else a.shared[k] == b.shared[k]
            for k in a.shared
        )
        and all(_kind(a.own[k]) == _kind(b.own[k]) for k in a.own)
    )


def run_together(*launches: QuantizeLaunch, query=None, rotations=None) -> tuple[list, torch.Tensor | None]:
    """(each launch's outputs, as `run()` returns them; the rotated queries or None), with two launches of one
    shape, the same settings and arguments of the same types (a frozen decode step's keys and values, coded at
    one device-side count) in one kernel launch: the second call's programs are the grid's second plane.
    Otherwise one launch each. query [B, Hq, 1, d] and rotations [KVH, d, d]: the step's queries rotated
    (`step.rotate_queries`) on a third plane of that launch, or in a launch of their own."""
    end = None if query is None else prepare_step_end(query, rotations, transposed=True)
    if len(launches) == 2 and _pairable(*launches):
        first, second = launches
        second_args = {f"{name}2": value for name, value in second.own.items()}
        if end is None:
            _quantize_rows[(*first.grid, 2)](
                **first.shared, **first.own, **second_args, **first.meta, PAIR=True
            )
            return [first.outputs, second.outputs], None
        (groups, columns), constants = end.grid, end.constants
        assert constants["TRANSPOSED"] and not constants["JOIN"], "the start rotates queries, nothing else"
        if groups != first.grid[1] or constants["DIM"] != first.meta["DIM"]:
            raise ValueError(f"the queries {tuple(query.shape)} are not those of these keys and values")
        _quantize_rows[(max(columns, first.grid[0]), groups, 3)](
            **first.shared, **first.own, **second_args, **first.meta, PAIR=True, query=end.rows,
            q_rotations=end.rotations, q_rotated=end.result, Q_KV_HEADS=constants["KV_HEADS"],
            Q_GROUP=constants["GROUP"], Q_ROWS=constants["ROWS"], Q_BLOCK=constants["BLOCK"], START=True,
        )  # fmt: skip
        return [first.outputs, second.outputs], end.result
    return [launch.run() for launch in launches], None if end is None else end.launch()


def _check_into(x, into, at, shapes: dict, norm_dtype) -> int:
    """The token capacity of the store `into` that x [..., T, d] is written into from token `at`."""
    if x.dim() < 2:
        raise ValueError(
            f"into takes the codes of x [..., T, d], with a token axis; x has shape {tuple(x.shape)}"
        )
    if len(into) != len(shapes):
        raise ValueError(f"into takes {len(shapes)} tensors ({', '.join(shapes)}); got {len(into)}")
    lead, tokens = tuple(x.shape[:-2]), x.shape[-2]
    first = into[0]
    capacity = first.shape[len(lead)] if first.dim() == len(lead) + 2 else "capacity"
    for (name, shape), t in zip(shapes.items(), into, strict=True):
        dtype = torch.uint8 if shape else norm_dtype
        want = (*lead, capacity, *shape)
        if tuple(t.shape) != want or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
            raise ValueError(
                f"into's {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected a contiguous {want} "
                f"{dtype} on {x.device}"
            )
    if capacity < tokens:
        raise ValueError(f"into holds {capacity} tokens per row, fewer than x's {tokens}")
    if at is None or at.dtype not in (torch.int32, torch.int64) or at.numel() != 1 or at.device != x.device:
        raise ValueError(
            f"into needs at: an int32 or int64 tensor of one element on {x.device} (the first token written)"
        )
    return capacity
