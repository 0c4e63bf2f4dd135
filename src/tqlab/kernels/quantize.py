"""Fused TurboQuant-MSE quantize: norm, rotation, Lloyd-Max bucketing and bit-packing in one pass.

Per row x: ‖x‖ (stored in the norm dtype), y = Π (x / ‖x‖) as a dense [d, d] product (any rotation,
via `rotation.matrix()`), idx_j = #{boundaries < y_j} exactly as `TurboQuantMSE.encode_rotated` counts,
packed eight codes per b-byte group in `pack_bits`' layout. The output tensors are those of
`TurboQuantMSE.quantize`: the indices agree bit for bit except where y_j lies within float32 round-off
of a boundary (our sum runs in another order than the reference matmul, and on a GPU the product is
"tf32x3": three TF32 tensor-core products, ~2^-22 relative error per term), and the fp16 norms agree
except where ‖x‖ rounds to fp16 within an fp32 ulp of a tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import MAX_BITS

BLOCK_ROWS = 64
BLOCK_COLS = 32  # square tiles of the rotation: larger ones spill registers with tf32x3 on sm_90


@triton.jit
def _quantize_rows(
    x, rotation, boundaries, codes, norms, rows, x_stride_g, x_stride_t, rotations,
    DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(1).to(tl.int64)  # a group of rows that share one rotation (a KV head)
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = row < rows
    x_rows = x + g * x_stride_g + row.to(tl.int64)[:, None] * x_stride_t
    rotation += (g % rotations) * DIM * DIM
    row = g * rows + row  # the output's row
    # Tiles of BLOCK_COLS along both axes keep the product's operands in registers at d = 256 (a whole
    # row block and rotation would spill); x is read once from HBM and re-read from cache per tile.
    part = tl.arange(0, BLOCK_COLS)
    squares = tl.zeros((BLOCK_ROWS,), tl.float32)
    for first in range(0, DIM, BLOCK_COLS):
        v = tl.load(x_rows + first + part[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        squares += tl.sum(v * v, axis=1)
    norm = tl.sqrt(squares)
    tl.store(norms + row, norm, mask=valid)
    inv_norm = 1.0 / tl.maximum(norm, 1.1754943508222875e-38)  # clamp_min(finfo(float32).tiny)

    row_bytes: tl.constexpr = DIM // 8 * BITS
    out = codes + row.to(tl.int64)[:, None] * row_bytes
    shifts = tl.arange(0, 8) * BITS
    for col in range(0, DIM, BLOCK_COLS):
        y = tl.zeros((BLOCK_ROWS, BLOCK_COLS), tl.float32)
        for first in range(0, DIM, BLOCK_COLS):
            v = tl.load(x_rows + first + part[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            unit = v * inv_norm[:, None]
            # Πᵀ[first:, col:] so that y = unit · Πᵀ, as Rotation.apply(x) = x @ Π.T
            rotation_t = tl.load(rotation + (col + part)[None, :] * DIM + (first + part)[:, None])
            y += tl.dot(unit, rotation_t, input_precision=PRECISION)
        idx = tl.zeros((BLOCK_ROWS, BLOCK_COLS), tl.int32)
        for k in tl.static_range((1 << BITS) - 1):
            idx += (y > tl.load(boundaries + k)).to(tl.int32)
        # Eight codes of a group have disjoint bits, so their shifted sum is their bitwise or.
        groups = tl.sum(tl.reshape(idx, (BLOCK_ROWS, BLOCK_COLS // 8, 8)) << shifts[None, None, :], axis=2)
        at = out + (col // 8 + tl.arange(0, BLOCK_COLS // 8))[None, :] * BITS
        for byte in tl.static_range(BITS):
            tl.store(at + byte, ((groups >> (8 * byte)) & 0xFF).to(tl.uint8), mask=valid[:, None])


def quantize_mse(
    x: torch.Tensor, rotation: torch.Tensor, boundaries: torch.Tensor, norm_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] → (indices uint8 [..., packed_row_bytes(d, bits)], norms [...] in norm_dtype): the
    tensors of `TurboQuantMSE.quantize`. rotation: Π as [d, d] (`codec.rotation.matrix()`, built once), or
    one per KV head, [H, d, d], for x [..., H, T, d] (head h coded by codec h, as the cache does);
    boundaries: `codec.boundaries` (2^bits − 1 of them). Unlike the codec it does not check for norms that
    overflow norm_dtype (they come back inf): that check would stall the GPU stream on every call."""
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
    if not x.is_floating_point() or x.device != rotation.device or x.device != boundaries.device:
        raise ValueError(
            f"x ({x.dtype}, {x.device}), rotation and boundaries must be floating tensors on one device"
        )
    rows = x.reshape(-1, x.shape[-2], dim) if per_head else x.reshape(1, -1, dim)  # [groups, rows, d]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes = torch.empty(*x.shape[:-1], dim // 8 * bits, dtype=torch.uint8, device=x.device)
    norms = torch.empty(x.shape[:-1], dtype=norm_dtype, device=x.device)
    precision = "tf32x3" if x.is_cuda else "ieee"
    _quantize_rows[(triton.cdiv(rows.shape[1], BLOCK_ROWS), rows.shape[0])](
        rows, rotation.float().contiguous(), boundaries.float().contiguous(), codes, norms,
        rows.shape[1], rows.stride(0), rows.stride(1), rotation.shape[0] if per_head else 1,
        DIM=dim, BITS=bits, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, PRECISION=precision,
        num_warps=8, num_stages=1,
    )  # fmt: skip
    return codes, norms
