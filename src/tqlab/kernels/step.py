"""The two ends of a decode step over codes, each one launch (a frozen step's start can also share the launch of
its key and value quantize, `quantize.run_together`): the query rotated into each KV head's key domain
before `decode_attention`, and after it the output rotated back with one exact token every query sees (the
step's own under prefill_exact, or a lone sink or recent token) joined.

In PyTorch each end is an fp32 cuBLAS product on CUDA cores plus casts, and under prefill_exact the own
token's logit, its softmax weight against the codes' log-sum-exp, and the mix: a dozen small kernels per layer
(docs/benchmarks.md, "Against a bf16 cache whose steps attend without a mask"). Here one program per
(sequence, KV head, block of output coordinates) does an end in fp32:

    q_rot = q · R_hᵀ                        (`rotate_queries`; R_h: KV head h's key rotation, [d, d])
    o = out · R_h                           (`finish_step`; R_h: the value rotation)
    w = sigmoid(scale · q·k − lse)          (the softmax weight of one exact key against the codes)
    o ← o + w · (v − o)                     (as torch.lerp computes it: exactly v at w = 1)

A row that saw no code (lse = −inf) takes v. Inputs of any float dtype are read as fp32 and the products
are fp32 `tl.dot`s at IEEE precision, so the results match `cache.fused._rotate`, `_rotate_back` and
`_with_exact` to fp32 round-off. `finish_step` can store the model's dtype, rounded once from fp32 as
`.to(dtype)` rounds (which saves the step a cast kernel).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

BLOCK_DIM = 32  # output coordinates per program: a [d, 32] slice of the rotation
MIN_ROWS = 16  # tl.dot's smallest M: a GQA group's query rows are padded to it


@triton.jit
def _step_end_kernel(
    rows_in, lse, rotations, query, keys, values, result, scaling,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
    BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr, JOIN: tl.constexpr,
):  # fmt: skip
    step_end(
        tl.program_id(0), tl.program_id(1), rows_in, lse, rotations, query, keys, values, result, scaling,
        KV_HEADS, GROUP, ROWS, DIM, BLOCK, TRANSPOSED, JOIN,
    )  # fmt: skip


@triton.jit
def step_end(
    bh, column, rows_in, lse, rotations, query, keys, values, result, scaling,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
    BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr, JOIN: tl.constexpr,
):  # fmt: skip
    """One program's share of an end: sequence × KV head `bh`, output coordinates `column`·BLOCK .. + BLOCK − 1
    (also run by the quantize of a step's keys and values, `quantize.run_together(..., query=)`)."""
    h = bh % KV_HEADS
    rows = tl.arange(0, ROWS)
    valid = rows < GROUP
    heads = bh * GROUP + rows  # row of [B · Hq]: sequence b's query heads h·G .. h·G + G − 1
    dims = tl.arange(0, DIM)
    cols = column * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(rows_in + heads[:, None] * DIM + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    if TRANSPOSED:  # [d, BLOCK] of R_hᵀ: R_h's rows `cols`
        matrix = tl.load(rotations + h * DIM * DIM + cols[None, :] * DIM + dims[:, None])
    else:
        matrix = tl.load(rotations + h * DIM * DIM + dims[:, None] * DIM + cols[None, :])
    o = tl.dot(x, matrix, input_precision="ieee")  # [ROWS, BLOCK] fp32
    if JOIN:
        q = tl.load(query + heads[:, None] * DIM + dims[None, :], mask=valid[:, None], other=0.0).to(
            tl.float32
        )
        k = tl.load(keys + bh * DIM + dims).to(tl.float32)
        v = tl.load(values + bh * DIM + cols).to(tl.float32)
        logit = tl.sum(q * k[None, :], axis=1) * scaling
        codes_lse = tl.load(lse + heads, mask=valid, other=0.0)
        weight = 1.0 / (1.0 + tl.exp(codes_lse - logit))  # lse = −inf: exp(−inf) = 0, weight 1
        w, v = weight[:, None], v[None, :]
        o = tl.where(w < 0.5, o + w * (v - o), v - (v - o) * (1.0 - w))  # torch.lerp's: exact at w = 0 and 1
    tl.store(result + heads[:, None] * DIM + cols[None, :], _rounded(o, result), mask=valid[:, None])


@triton.jit
def _round_to_bfloat16(x):
    """fp32 → bf16 to nearest, ties to even, NaN kept (as torch rounds), in integer arithmetic: Triton's
    interpreter, which the CPU tests run, truncates a bf16 store instead of rounding it."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rounded(x, out):
    """x as `out` stores it, rounded to nearest where that is bf16 (the interpreter's bf16 store truncates)."""
    if out.dtype.element_ty == tl.bfloat16:  # a compile-time branch with one return (two fail to compile)
        x = _round_to_bfloat16(x)
    return x


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """One end's checked arguments: `launch()` runs it alone; `quantize.run_together` can run a query
    rotation on a plane of the step's key and value quantize."""

    args: tuple  # the kernel's runtime arguments, in order
    constants: dict  # its compile-time ones
    grid: tuple[int, int]  # (sequences × KV heads, output blocks)
    result: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        """The rows rotated (contiguous)."""
        return self.args[0]

    @property
    def rotations(self) -> torch.Tensor:
        """The fp32 [KVH, d, d] matrices."""
        return self.args[2]

    def launch(self) -> torch.Tensor:
        _step_end_kernel[self.grid](*self.args, **self.constants)
        return self.result


def prepare(
    x, rotations, transposed, query=None, keys=None, values=None, lse=None, scaling=None, dtype=torch.float32
) -> StepEnd:
    batch, q_heads, q_len, dim = x.shape
    kv_heads = rotations.shape[0]
    if (
        q_len != 1
        or dim < BLOCK_DIM
        or dim & (dim - 1)
        or rotations.shape[1:] != (dim, dim)
        or q_heads % kv_heads
    ):
        raise ValueError(
            f"a step's ends take one query token, d a power of two ≥ {BLOCK_DIM} and [KVH, d, d] rotations "
            f"with KVH dividing the query heads, not {tuple(x.shape)} and rotations {tuple(rotations.shape)}"
        )
    join = query is not None
    if join and (keys.shape != (batch, kv_heads, 1, dim) or values.shape != keys.shape):
        raise ValueError(f"one exact key and value per KV head, [B, KVH, 1, d]: not {tuple(keys.shape)}")
    if join and (query.shape != x.shape or lse.shape != x.shape[:3] or scaling is None):
        raise ValueError(
            f"the join takes query {tuple(x.shape)}, lse {tuple(x.shape[:3])} and a scaling: got query "
            f"{tuple(query.shape)}, lse {tuple(lse.shape)}, scaling {scaling}"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"a step's end stores float32, bfloat16 or float16, not {dtype}")
    group = q_heads // kv_heads
    result = torch.empty(x.shape, dtype=dtype, device=x.device)
    x = x.contiguous()
    args = (
        x, lse.float().contiguous() if join else x, rotations.float().contiguous(),
        query.contiguous() if join else x, keys.contiguous() if join else x,
        values.contiguous() if join else x, result, float(scaling) if join else 0.0,
    )  # fmt: skip
    constants = dict(
        KV_HEADS=kv_heads, GROUP=group, ROWS=max(MIN_ROWS, triton.next_power_of_2(group)), DIM=dim,
        BLOCK=BLOCK_DIM, TRANSPOSED=transposed, JOIN=join,
    )  # fmt: skip
    return StepEnd(args, constants, (batch * kv_heads, dim // BLOCK_DIM), result)


def rotate_queries(query: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """query [B, Hq, 1, d] (any float dtype) → [B, Hq, 1, d] fp32, each query head times its KV head's
    rotation Π ([KVH, d, d]): Πq, the rotated domain `decode_attention` scores in."""
    return prepare(query, rotations, transposed=True).launch()


def finish_step(
    out, lse, rotations, query=None, keys=None, values=None, scaling: float | None = None, dtype=torch.float32
):
    """out [B, Hq, 1, d] fp32 in each KV head's rotated domain → [B, Hq, 1, d] rotated back by `rotations`
    [KVH, d, d] (each head's rows times its KV head's matrix), computed in fp32 and stored in dtype (fp32,
    bf16 or fp16: the model's, rounded as `.to(dtype)` rounds); with query [B, Hq, 1, d], keys and values
    [B, KVH, 1, d] (one exact token every query sees; any float dtype) and scaling, that token joined by one
    softmax with the codes' log-sum-exp lse [B, Hq, 1] (fp32)."""
    return prepare(out, rotations, False, query, keys, values, lse, scaling, dtype).launch()
