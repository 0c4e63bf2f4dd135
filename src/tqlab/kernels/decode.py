"""Fused decode attention over TurboQuant-MSE and -Prod codes (split-K flash decoding, never a dequantized cache).

For query rows r (the query heads of one KV head × the step's query tokens) and key tokens t < L_b,
all in the rotated domain (the caller passes Πq and applies Πᵀ to the output once):
    s_rt = scaling · ‖k_t‖ · ⟨Πq_r, c[idx_t]⟩,   o_r = Σ_t softmax(s_r)_t · ‖v_t‖ · c[idx^v_t],
the same sums as `tqlab.cache.attention.attend`. Each program takes one (sequence, KV head) and one
contiguous chunk of tokens (split-K, so a single long sequence still fills every SM); it decodes BLOCK_N
keys at a time from their packed bytes into fp16 centroids (`packed.load_centroids`), scores the whole GQA
group with one tensor-core `tl.dot`, and keeps an online softmax in base 2. A second kernel merges the
chunks by their log-sum-exp; on sm_90 and newer it is launched while the first runs and waits on the device for
its partial results (programmatic dependent launch). Query token j of Tq sits at position L_b − Tq + j and
sees keys t ≤ that.

On an NVIDIA GPU (sm_80 or newer) problems of at least REGISTER_KERNEL_MIN_KEYS keys × KV heads × sequences
go to `decode_mma._attend_chunk_mma` instead, which computes the same sums with the codes decoded straight
into tensor-core operand registers (3- and 4-bit keys and 3-bit values over long chunks looked up in tables of
centroid pairs in shared memory, everything else decoded in registers); this kernel serves the rest, the
interpreter, and the shapes `decode_mma.supports` refuses. The two keep the same chunking, masking and
partial outputs, so a change to one's masking belongs in the other too. Prod codes (`QJLSketch`) take this
kernel only: their keys add √(π/2)/d · ‖r_t‖ ⟨S Πq_r, s_t⟩ to the inner product, their values
√(π/2)/d · ‖r_t‖ Sᵀ s_t to c[idx^v_t].

Precision: dot operands are fp16 (each query row is scaled to max |·| = 1 first; centroids lie in
[−1, 1]; p · ‖v‖ ≤ 65504 since norms are stored in fp16), accumulation and softmax are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

try:  # grid dependency control (programmatic dependent launch), in the CUDA extras of recent triton releases
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older triton, or one without the CUDA extras: the merge launches after the attention
    gdc_launch_dependents = gdc_wait = None

from ..quant.codes import NORM_DTYPES
from .packed import check_code_bits, decode_table, load_centroids, load_signs

BLOCK_N = 128  # keys decoded per step
MIN_BLOCKS_PER_SPLIT = 2  # shorter chunks spend more on the prologue and the merge than they save
CTAS_PER_SM = 4  # enough independent chunks in flight to keep HBM busy
NUM_WARPS = 4
MAX_ROWS = 32  # query rows per (sequence, KV head): 64 fails to compile for sm_90 under Triton 3.6
# Keys × KV heads × sequences from which the register-fragment kernel (`decode_mma`) is used on a GPU: from 32 768
# it is as fast or faster (by 0.1–4.0 µs) in every layout and width measured; at 16 384 each kernel wins some
# (H200, tools/research/gpu_decode_threshold.py; docs/benchmarks.md).
REGISTER_KERNEL_MIN_KEYS = 32768
MERGE_SPLITS = 512  # most chunks one merge step reads (128: 2–3 µs slower at 512 chunks, H200)
# Register-kernel programs of two warps where they pay ("auto") or wherever they apply ("always": tests)
TWO_WARPS = "auto"
MERGE_DIMS = 32  # output dimensions per merge program
NUM_STAGES = 2  # prefetch the next block's words; 1 leaves HBM latency exposed (measured on an H200)
# sm_90+: the merge is launched while the attention kernel runs (programmatic dependent launch) and waits on
# the device for its partial results, instead of after it, one launch latency later.
PROGRAMMATIC_LAUNCH = True


@triton.jit
def _scaled_rows(base, b, head, token, stride_b, stride_h, stride_t, dims, row_valid, scale_log2):
    """Query rows (times scale_log2) as fp16 scaled to max |·| = 1, and their fp32 scales (1 for a zero row)."""
    at = base + b.to(tl.int64) * stride_b + head * stride_h + token * stride_t
    x = tl.load(at[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32)
    x *= scale_log2
    scale = tl.max(tl.abs(x), axis=1)
    scale = tl.where(scale > 0, scale, 1.0)
    return (x / scale[:, None]).to(tl.float16), scale


@triton.jit
def _mean_scores(base, b, head, token, stride_b, stride_h, stride_t, dims, row_valid, scale_log2, mean):
    """scale_log2 · ⟨q, μ⟩ per query row (fp32): what a key mean μ adds to each of the row's scores."""
    at = base + b.to(tl.int64) * stride_b + head * stride_h + token * stride_t
    q = tl.load(at[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32)
    return tl.sum(q * tl.load(mean + dims)[None, :], axis=1) * scale_log2


@triton.jit
def _sketch_rows(codes, residual_norms, b, h, stride_b, stride_h, norm_stride_b, norm_stride_h):
    """Pointers to one (sequence, KV head)'s sign bits and residual norms (Prod's second stage)."""
    return (
        codes + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h,
        residual_norms + b.to(tl.int64) * norm_stride_b + h.to(tl.int64) * norm_stride_h,
    )


@triton.jit
def _attend_chunk(
    query, k_codes, k_norms, v_codes, v_norms, k_table, v_table, lengths, starts, part_out, part_lse,
    scale_log2, chunk, splits, causal_shift,
    q_stride_b, q_stride_h, q_stride_t,
    kc_stride_b, kc_stride_h, kn_stride_b, kn_stride_h,
    vc_stride_b, vc_stride_h, vn_stride_b, vn_stride_h,
    q_sketch, k_signs, k_residual_norms, v_signs, v_residual_norms, k_qjl_scale,
    qs_stride_b, qs_stride_h, qs_stride_t,
    ks_stride_b, ks_stride_h, kr_stride_b, kr_stride_h, vs_stride_b, vs_stride_h, vr_stride_b, vr_stride_h,
    key_mean, value_mean,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, Q_LEN: tl.constexpr, DIM: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTE: tl.constexpr, PADDED: tl.constexpr, K_SKETCH: tl.constexpr = False, V_SKETCH: tl.constexpr = False,
    KEY_MEAN: tl.constexpr = False, VALUE_MEAN: tl.constexpr = False, LAUNCH_MERGE: tl.constexpr = False,
):  # fmt: skip
    if LAUNCH_MERGE:  # the merge may start its launch now; it waits for this grid's results on the device
        gdc_launch_dependents()
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // KV_HEADS, bh % KV_HEADS
    length = tl.load(lengths + b).to(tl.int32)
    first_key = tl.load(starts + b).to(tl.int32) if PADDED else 0  # keys before it are padding
    if chunk == 0:  # a launch that does not depend on the lengths: this sequence's keys split evenly
        chunk = tl.cdiv(length, splits * BLOCK_N) * BLOCK_N
    start = tl.maximum(split * chunk, first_key // BLOCK_N * BLOCK_N)
    stop = tl.minimum(split * chunk + chunk, length)

    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * Q_LEN
    head, token = h * GROUP + rows // Q_LEN, rows % Q_LEN
    dims = tl.arange(0, DIM)
    q16, q_scale = _scaled_rows(
        query, b, head, token, q_stride_b, q_stride_h, q_stride_t, dims, row_valid, scale_log2
    )
    last_key = length - Q_LEN + token + causal_shift  # causal among the step's own tokens
    if K_SKETCH:  # Prod keys: the query's projection S Πq, scaled as q
        sq16, sq_scale = _scaled_rows(
            q_sketch, b, head, token, qs_stride_b, qs_stride_h, qs_stride_t, dims, row_valid, scale_log2
        )
        sq_scale *= k_qjl_scale
        ks, kr = _sketch_rows(
            k_signs, k_residual_norms, b, h, ks_stride_b, ks_stride_h, kr_stride_b, kr_stride_h
        )
    if V_SKETCH:  # Prod values: Σ p ‖v‖ ‖r‖ s, to which the caller applies Sᵀ and √(π/2)/d once
        vs, vr = _sketch_rows(
            v_signs, v_residual_norms, b, h, vs_stride_b, vs_stride_h, vr_stride_b, vr_stride_h
        )
        acc_sketch = tl.zeros((BLOCK_M, DIM), tl.float32)

    kc = k_codes + b.to(tl.int64) * kc_stride_b + h.to(tl.int64) * kc_stride_h
    kn = k_norms + b.to(tl.int64) * kn_stride_b + h.to(tl.int64) * kn_stride_h
    vc = v_codes + b.to(tl.int64) * vc_stride_b + h.to(tl.int64) * vc_stride_h
    vn = v_norms + b.to(tl.int64) * vn_stride_b + h.to(tl.int64) * vn_stride_h
    k_codebook = decode_table(k_table, K_BITS)
    v_codebook = decode_table(v_table, V_BITS)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DIM), tl.float32)
    for block in range(start, stop, BLOCK_N):
        keys = block + tl.arange(0, BLOCK_N)
        key_valid = keys < stop
        k = load_centroids(kc, k_codebook, keys, key_valid, K_BITS, DIM, PERMUTE)
        k_norm = tl.load(kn + keys, mask=key_valid, other=0.0).to(tl.float32)
        if K_SKETCH:  # ‖k‖ (⟨q, c[idx]⟩ + √(π/2)/d ‖r‖ ⟨S q, s⟩)
            r_norm = tl.load(kr + keys, mask=key_valid, other=0.0).to(tl.float32)
            qjl = tl.dot(sq16, tl.trans(load_signs(ks, keys, key_valid, DIM))) * sq_scale[:, None]
            s = (tl.dot(q16, tl.trans(k)) * q_scale[:, None] + qjl * r_norm[None, :]) * k_norm[None, :]
        else:
            s = tl.dot(q16, tl.trans(k)) * q_scale[:, None] * k_norm[None, :]
        seen = key_valid[None, :] & (keys[None, :] <= last_key[:, None]) & (keys[None, :] >= first_key)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_centroids(vc, v_codebook, keys, key_valid, V_BITS, DIM, PERMUTE)
        v_norm = tl.load(vn + keys, mask=key_valid, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot((p * v_norm[None, :]).to(tl.float16), v)
        if V_SKETCH:
            w = p * (v_norm * tl.load(vr + keys, mask=key_valid, other=0.0).to(tl.float32))[None, :]
            acc_sketch = acc_sketch * alpha[:, None] + tl.dot(
                w.to(tl.float16), load_signs(vs, keys, key_valid, DIM)
            )
        m_i = m_new

    part = (bh * splits + split) * BLOCK_M + rows
    out_dim: tl.constexpr = 2 * DIM if V_SKETCH else DIM  # Prod values: the sketch's sum after the output
    norm = tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = acc / norm
    if VALUE_MEAN:  # codes of v − μ: a row that saw any adds Σ p μ = μ
        out += (l_i > 0).to(tl.float32)[:, None] * tl.load(value_mean + h * DIM + dims)[None, :]
    tl.store(part_out + part[:, None] * out_dim + dims[None, :], out)
    if V_SKETCH:
        tl.store(part_out + part[:, None] * out_dim + DIM + dims[None, :], acc_sketch / norm)
    lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
    if KEY_MEAN:  # codes of k − μ: every score of a row plus scaling · q·μ, and so its log-sum-exp
        lse += _mean_scores(
            query, b, head, token, q_stride_b, q_stride_h, q_stride_t, dims, row_valid, scale_log2,
            key_mean + h * DIM,
        )  # fmt: skip
    tl.store(part_lse + part, tl.where(l_i > 0, lse, float("-inf")))


# Inline PTX (the 4-bit byte permutes) needs the compiler for an NVIDIA GPU: not Triton's interpreter (which
# decorated the kernels if TRITON_INTERPRET was set at import), not ROCm.
INTERPRETED = isinstance(_attend_chunk, InterpretedFunction)  # TRITON_INTERPRET=1 at import: CPU tensors
_PTX = not INTERPRETED and torch.version.hip is None


@triton.jit
def _merge_chunks(
    part_out, part_lse, out, out_lse, splits, o_stride_b, o_stride_h, o_stride_t,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, Q_LEN: tl.constexpr, DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WAIT: tl.constexpr = False,
):  # fmt: skip
    """One query row's output over dimensions slice·BLOCK_D .. + BLOCK_D − 1 from its chunks' partial
    outputs, weighted by their log-sum-exp (slices in parallel: a row may have hundreds of chunks). WAIT: launched
    before the attention kernel finished (programmatic dependent launch), so wait for its results first."""
    if WAIT:
        gdc_wait()
    bh, row, dim_slice = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dims = dim_slice * BLOCK_D + tl.arange(0, BLOCK_D)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for first in range(0, splits, BLOCK_S):
        split = first + tl.arange(0, BLOCK_S)
        part = (bh * splits + split) * BLOCK_M + row
        lse = tl.load(part_lse + part, mask=split < splits, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_shift)
        alpha = tl.exp2(m - m_shift)
        o = tl.load(part_out + part[:, None] * DIM + dims[None, :], mask=(split < splits)[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        total = total * alpha + tl.sum(w, axis=0)
        m = m_new
    b, h = bh // KV_HEADS, bh % KV_HEADS
    head, token = h * GROUP + row // Q_LEN, row % Q_LEN
    at = out + b * o_stride_b + head * o_stride_h + token * o_stride_t + dims
    tl.store(at, acc / tl.maximum(total, 1e-30))  # a query that sees no key gets 0, as in `attend`
    if dim_slice == 0:  # natural-log LSE of the scaled scores (−inf when the query sees no key)
        lse = tl.where(total > 0, (m + tl.log2(tl.maximum(total, 1e-30))) * 0.6931471805599453, float("-inf"))
        tl.store(out_lse + (b * KV_HEADS * GROUP + head) * Q_LEN + token, lse)


@functools.cache
def _mma_kernel():
    """`decode_mma` (Gluon, NVIDIA), or None where this triton has no Gluon."""
    try:
        from . import decode_mma
    except ImportError:
        return None
    return decode_mma


@dataclasses.dataclass(frozen=True)
class QJLSketch:
    """TurboQuant-Prod's second stage of one side, for `decode_attention`: per token the sign bits of S r and
    ‖r‖ of its residual (`ProdCode.signs`, `.residual_norms`), and per KV head S itself."""

    signs: torch.Tensor  # uint8 [B, KVH, T, d/8]
    residual_norms: torch.Tensor  # [B, KVH, T]
    projection: torch.Tensor  # fp32 [KVH, d, d]: each KV head's codec.projection (qjl_dim = d)
    scale: float  # codec.qjl_scale, √(π/2)/d

    def check(self, name: str, batch: int, kv_heads: int, tokens: int, dim: int, device) -> None:
        for field, t, shape in [
            ("signs", self.signs, (batch, kv_heads, tokens, dim // 8)),
            ("residual_norms", self.residual_norms, (batch, kv_heads, tokens)),
            ("projection", self.projection, (kv_heads, dim, dim)),
        ]:
            if tuple(t.shape) != shape or t.device != device:
                raise ValueError(
                    f"{name}.{field} has shape {tuple(t.shape)} on {t.device}; expected {shape} on {device}"
                )
        signs = self.signs
        if any(s % 4 for s in signs.stride()[:2]) or self.projection.dtype != torch.float32:
            raise ValueError(
                f"{name}: signs rows must start at multiples of 4 bytes per (sequence, head) and the projection "
                "must be fp32"
            )
        if (
            signs.dtype != torch.uint8
            or signs.stride(-1) != 1
            or signs.stride(-2) != dim // 8
            or signs.data_ptr() % 4
        ):
            raise ValueError(
                f"{name}.signs must be uint8 rows of {dim // 8} bytes, contiguous, 4-byte aligned"
            )
        if self.residual_norms.stride(-1) != 1 or not self.residual_norms.is_floating_point():
            raise ValueError(f"{name}.residual_norms must be floating, contiguous along the tokens")


_RESIDENT: dict[tuple, int] = {}  # one-warp programs an SM holds, per compiled register-fragment kernel
_RESERVED_SHARED = 1024  # bytes of shared memory CUDA reserves per block


def _resident_programs(device_index: int | None, registers: int, default: int, shared: int = 0) -> int:
    """One-warp programs one SM holds at `registers` per thread: each of its four sub-partitions holds a
    quarter of the register file, allocated per warp in units of 256 (8 per thread); at most 32 blocks
    per SM; with `shared` bytes of shared memory each, no more than fit the SM's.
    `default` where torch does not report the register file."""
    properties = torch.cuda.get_device_properties(device_index)
    per_sm = getattr(properties, "regs_per_multiprocessor", None)
    if not per_sm:
        return default
    programs = max(1, min(32, 4 * (per_sm // 4 // (32 * -(-registers // 8) * 8))))
    if shared:
        shared_per_sm = getattr(properties, "shared_memory_per_multiprocessor", 0)
        programs = max(1, min(programs, shared_per_sm // (shared + _RESERVED_SHARED)))
    return programs


@functools.cache
def _shared_per_sm(device_index: int | None) -> int:
    """Bytes of shared memory per SM (0 where torch does not report it)."""
    properties = torch.cuda.get_device_properties(device_index)
    return getattr(properties, "shared_memory_per_multiprocessor", 0) or 0


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class RegisterLaunch:
    """How `decode_attention` launches the register-fragment kernel (`register_launch`)."""

    splits: int  # chunks per (sequence, KV head): the grid is (sequences × KV heads, splits)
    chunk: int  # keys per chunk; 0 where the kernel splits each sequence's own keys evenly (static_launch)
    warps: int  # per program: 1, or 2 where `decode_mma.two_warps` takes the shape
    lookup_keys: bool  # 3- and 4-bit keys read from shared-memory tables of centroid pairs


def register_launch(
    mma, batch: int, kv_heads: int, tokens: int, dim: int, k_bits: int, v_bits: int, rows: int, *, sms: int,
    resident: int, two_warp_resident: int, shared_per_sm: int, num_splits: int | None = None,
    static_launch: bool = False,
) -> RegisterLaunch:  # fmt: skip
    """The register-fragment kernel's launch (`mma` is `decode_mma`) over `batch` sequences × `kv_heads` heads of
    `tokens` keys with `rows` query rows per KV head, on `sms` SMs that each hold `resident` one-warp or
    `two_warp_resident` two-warp programs and `shared_per_sm` bytes of shared memory (0: unknown). The device
    enters only through those numbers (and `mma` is passed in, since it imports only where triton has Gluon), so
    the rules are tested without a GPU; TWO_WARPS is read from this module. num_splits: chunks per (sequence, KV
    head), else chosen here:

    - at most one wave of resident one-warp programs (a second, sparse wave would take as long as the first);
    - chunks of SHORT_BLOCKS_PER_SPLIT blocks where those all fit in that wave, else of at least
      MIN_BLOCKS_PER_SPLIT (docs/benchmarks.md, "Launch shape and merge");
    - short chunks that two-warp programs can take go down to TWO_WARP_MIN_BLOCKS_PER_SPLIT blocks while they
      make at most TWO_WARP_SHORT_PROGRAMS_PER_SM per SM ("Shorter chunks for two warps"); such programs are
      launched where the short chunks fit in one wave of them ("Programs of two warps"; TWO_WARPS = "always",
      for tests, wherever `two_warps` takes the shape); where they do not, up to TWO_WARP_SHORT_PROGRAMS_PER_SM
      per SM take longer chunks ("Longer chunks of two warps rather than one warp"), as they do with at least
      TWO_WARP_LONGER_MIN_ROWS query rows where the short chunks fit that wave but make more than
      TWO_WARP_SHORT_PROGRAMS_PER_SM per SM ("Longer two-warp chunks at six query rows or more"); unless chunks
      that long are long enough for pair tables (LOOKUP_MIN_BLOCKS): then the short chunks stay (on one warp
      where they do not fit the wave; 3-bit keys were slower in two-warp chunks of 8 blocks than of 4);
    - 3- and 4-bit keys from pair tables where chunks are long (LOOKUP_MIN_BLOCKS), the programs fill at least
      LOOKUP_MIN_WAVE of a wave, and the tables of `resident` programs fit an SM's shared memory, so that they
      cost no occupancy."""
    block_n = mma.block_keys(dim)
    blocks = triton.cdiv(tokens, block_n)

    def long_chunks(splits: int) -> bool:  # long enough for pair tables
        return (
            k_bits in mma.PAIR_COPIES and dim >= mma.LOOKUP_MIN_DIM
            and triton.cdiv(blocks, splits) >= mma.LOOKUP_MIN_BLOCKS[k_bits]
        )  # fmt: skip

    def pair_tables(splits: int) -> bool:
        return (
            long_chunks(splits)
            and batch * kv_heads * splits >= mma.LOOKUP_MIN_WAVE * resident * sms
            and shared_per_sm >= resident * (mma.pair_table_bytes(k_bits, v_bits) + _RESERVED_SHARED)
        )  # fmt: skip

    short = False  # chunks of at most SHORT_BLOCKS_PER_SPLIT blocks, all in one wave
    if num_splits is None:
        per_head = max(1, resident * sms // (batch * kv_heads))
        short = blocks // mma.SHORT_BLOCKS_PER_SPLIT <= per_head
        if short:
            num_splits = max(1, blocks // mma.SHORT_BLOCKS_PER_SPLIT)
            if mma.two_warps(dim, k_bits, v_bits, rows, lookup=False):
                per_sm = min(mma.TWO_WARP_SHORT_PROGRAMS_PER_SM, two_warp_resident)
                fill = per_sm * sms // (batch * kv_heads)
                one_wave = batch * kv_heads * num_splits <= two_warp_resident * sms
                lengthen = not one_wave or rows >= mma.TWO_WARP_LONGER_MIN_ROWS
                if num_splits <= fill:  # shorter still while they are few
                    num_splits = max(num_splits, min(blocks // mma.TWO_WARP_MIN_BLOCKS_PER_SPLIT, fill))
                elif lengthen and fill and not long_chunks(min(fill, blocks)):  # longer two-warp chunks
                    num_splits = fill
        else:
            num_splits = min(per_head, blocks // mma.MIN_BLOCKS_PER_SPLIT)
    chunk, splits = _chunks(tokens, blocks, block_n, num_splits, static_launch)
    lookup_keys = pair_tables(splits)
    warps = 1
    if mma.two_warps(dim, k_bits, v_bits, rows, lookup_keys):
        fits = batch * kv_heads * splits <= two_warp_resident * sms
        warps = 2 if TWO_WARPS == "always" or (short and fits) else 1
    return RegisterLaunch(splits, chunk, warps, lookup_keys)


def _chunks(tokens: int, blocks: int, block_n: int, num_splits: int, static_launch: bool) -> tuple[int, int]:
    """(keys per chunk, chunks) for about `num_splits` chunks of whole blocks of `block_n` keys, at most one per
    block; under static_launch chunk 0 (each sequence's own keys are split on the device)."""
    if static_launch:
        return 0, max(1, min(num_splits, blocks))
    chunk = triton.cdiv(blocks, max(1, min(num_splits, blocks))) * block_n
    return chunk, triton.cdiv(tokens, chunk)


@functools.cache
def _has_programmatic_launch(device_index: int | None) -> bool:
    """Programmatic dependent launch (`griddepcontrol`) needs sm_90 or newer."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.cache
def _has_mma_sync(device_index: int | None) -> bool:
    """`decode_mma` issues m16n8k16 fp16 `mma.sync`, which needs sm_80 or newer."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def decode_attention(
    query: torch.Tensor,
    key_indices: torch.Tensor,
    key_norms: torch.Tensor,
    value_indices: torch.Tensor,
    value_norms: torch.Tensor,
    key_table: torch.Tensor,
    value_table: torch.Tensor,
    lengths: torch.Tensor,
    scaling: float,
    num_splits: int | None = None,
    starts: torch.Tensor | None = None,
    causal_shift: int = 0,
    static_launch: bool = False,
    key_sketch: QJLSketch | None = None,
    value_sketch: QJLSketch | None = None,
    key_mean: torch.Tensor | None = None,
    value_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of rotated queries [B, Hq, Tq, d] over packed codes [B, KVH, T, packed bytes] with norms
    [B, KVH, T] (fp16, bf16 or fp32; value norms up to fp16's 65 504, since p·‖v‖ is an fp16 operand: larger
    ones come back inf or NaN, and the cache refuses them, `TurboQuantLayer.check_norms`); sequence b holds
    its first lengths[b] tokens (0 <= lengths[b] <= T: checked where lengths are on the host; on the device
    the kernels alone read them, as the cache keeps them, since reading them back would stall the stream), of
    which the first starts[b] (default 0) are
    padding that no query sees. Query token j sees keys t <= lengths[b] − Tq + j + causal_shift: with the
    default 0 the queries are the last Tq stored tokens; causal_shift = n says n more tokens, held
    elsewhere (exact), follow the codes.

    key_table / value_table: `centroid_table(codec.centroids)`, indexed by the stored codes: with 4-bit codes
    stored as sign-magnitude labels (`packed.sign_magnitude`, as the cache stores them, and the register
    kernel's shorter decode), `centroid_table(codec.centroids, sign_magnitude=True)`. num_splits: chunks per (sequence, KV
    head); by default enough to fill every SM, and for `decode_mma` at most one wave of its resident programs
    (at its compiled register count) in chunks of its SHORT_BLOCKS_PER_SPLIT or MIN_BLOCKS_PER_SPLIT blocks
    (down to TWO_WARP_MIN_BLOCKS_PER_SPLIT where two-warp programs would be fewer than
    TWO_WARP_SHORT_PROGRAMS_PER_SM per SM).
    starts=None: no padding (the kernels then neither read nor compare it).
    static_launch: the launch depends on T (the tensors' capacity) alone, never on the lengths, whose values
    are read on the device only — each sequence's keys are split evenly over the chunks in the kernel — so
    that a CUDA graph may replay it while the lengths grow.
    key_sketch / value_sketch: the side's codes are TurboQuant-Prod's — key_indices / value_indices then
    hold its Stage-1 codes (tables of codec.mse's centroids) — scored with Prod's estimator ‖k‖(⟨q, c[idx]⟩
    + √(π/2)/d ‖r‖ ⟨Sq, s⟩) and accumulated as its dequantized values ‖v‖(c[idx] + √(π/2)/d ‖r‖ Sᵀs) (S
    applied once to the weighted sum of signs); these take the Triton-language kernel.
    key_mean / value_mean: the side's codes are of x − μ (`Centered`); Πμ, fp32 [KVH, d] in the rotated
    domain. Each score then adds scaling·⟨Πq, Πμ_k⟩ (so the log-sum-exp moves and the softmax does not),
    and the output of a query that saw any code adds Πμ_v: the attention over the keys and values the codes
    stand for, with no pass of its own.
    Returns fp32 [B, Hq, Tq, d] in the rotated domain and the natural-log sum of exp of the scaled scores,
    [B, Hq, Tq] (−inf for a query that sees no key).
    """
    if query.dim() != 4 or key_indices.dim() != 4 or not query.is_floating_point():
        raise ValueError(
            f"query must be a floating [B, Hq, Tq, d] tensor and the codes [B, KVH, T, bytes]; got {query.dtype} "
            f"{tuple(query.shape)} and {tuple(key_indices.shape)}"
        )
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number (the scores' factor), got {type(scaling).__name__}")
    batch, q_heads, q_len, dim = query.shape
    _, kv_heads, tokens, _ = key_indices.shape
    if kv_heads < 1 or q_len < 1:
        raise ValueError(f"need at least one KV head and one query token; got {kv_heads} and {q_len}")
    k_bits = check_code_bits(key_indices.shape[-1], dim, "key_indices")
    v_bits = check_code_bits(value_indices.shape[-1], dim, "value_indices")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot be grouped over {kv_heads} KV heads")
    for name, t, shape in [
        ("key_indices", key_indices, (batch, kv_heads, tokens, dim // 8 * k_bits)),
        ("value_indices", value_indices, (batch, kv_heads, tokens, dim // 8 * v_bits)),
        ("key_norms", key_norms, (batch, kv_heads, tokens)),
        ("value_norms", value_norms, (batch, kv_heads, tokens)),
    ]:
        if tuple(t.shape) != shape or t.device != query.device:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} on {t.device}; expected {shape} on {query.device}"
            )
    for name, t in [("lengths", lengths), ("starts", starts)]:
        if t is not None and (
            tuple(t.shape) != (batch,) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool
        ):
            raise ValueError(
                f"{name} must be an integer tensor of shape ({batch},), one per sequence; got {t.dtype} "
                f"{tuple(t.shape)}"
            )
    # On the device a length is not read back (a sync): the caller keeps them in range, as the cache does
    if (
        lengths.device.type == "cpu"
        and lengths.numel()
        and not bool(((lengths >= 0) & (lengths <= tokens)).all())
    ):
        raise ValueError(f"lengths {lengths.tolist()} must lie in 0..{tokens}, the tokens the codes hold")
    for name, t in [("key_norms", key_norms), ("value_norms", value_norms)]:
        if t.dtype not in NORM_DTYPES:
            raise ValueError(
                f"{name} must be float16, bfloat16 or float32 (as codecs store norms); got {t.dtype}"
            )
    if key_indices.dtype != torch.uint8 or value_indices.dtype != torch.uint8:
        raise ValueError("key_indices and value_indices must be uint8 packed codes (MSECode.indices)")
    for name, t in [("key_indices", key_indices), ("value_indices", value_indices)]:
        if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1] or any(s % 4 for s in t.stride()[:2]):
            raise ValueError(f"{name} needs contiguous rows per (sequence, head); call .contiguous()")
        if t.data_ptr() % 4:
            raise ValueError(
                f"{name} must start at a multiple of 4 bytes (the kernel reads int32 words); clone it"
            )
    if key_norms.stride(-1) != 1 or value_norms.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("norms and query must be contiguous along their last axis")
    for name, table, bits in [("key_table", key_table, k_bits), ("value_table", value_table, v_bits)]:
        if (
            table.dtype != torch.float16 or table.numel() != 2**bits or table.device != query.device
            or not table.is_contiguous()
        ):  # fmt: skip
            raise ValueError(
                f"{name} must be centroid_table(centroids[, sign_magnitude]) of a {bits}-bit codebook on "
                f"{query.device}"
            )

    for name, sketch in [("key_sketch", key_sketch), ("value_sketch", value_sketch)]:
        if sketch is not None:
            sketch.check(name, batch, kv_heads, tokens, dim, query.device)
    for name, mean in [("key_mean", key_mean), ("value_mean", value_mean)]:
        if mean is not None and (
            tuple(mean.shape) != (kv_heads, dim) or mean.dtype != torch.float32 or mean.device != query.device
            or not mean.is_contiguous()
        ):  # fmt: skip
            raise ValueError(
                f"{name} must be a contiguous fp32 [{kv_heads}, {dim}] tensor on {query.device} (Πμ per KV head); "
                f"got {mean.dtype} {tuple(mean.shape)} on {mean.device}"
            )

    group = q_heads // kv_heads
    if group * q_len > MAX_ROWS:
        raise ValueError(
            f"{group} query heads per KV head × {q_len} query tokens = {group * q_len} rows exceed the kernel's "
            f"{MAX_ROWS}: call it on chunks of query tokens (as tqlab.cache.fused does)"
        )
    if batch == 0 or tokens == 0:  # no codes: no query sees a key
        lse = torch.full((batch, q_heads, q_len), float("-inf"), device=query.device)
        out = torch.zeros(batch, q_heads, q_len, 2 * dim if value_sketch else dim, device=query.device)
        return _with_value_sketch(out, value_sketch), lse
    mma = None
    sketched = key_sketch is not None or value_sketch is not None
    if _PTX and query.is_cuda and batch * kv_heads * tokens >= REGISTER_KERNEL_MIN_KEYS and not sketched:
        mma = _mma_kernel() if _has_mma_sync(query.device.index) else None
        mma = mma if mma is not None and mma.supports(dim, k_bits, v_bits, group * q_len) else None
    padded = starts is not None  # otherwise no padding: nothing to read (and no kernel to fill zeros)
    if mma:  # codes decoded into the tensor cores' operand registers: one warp per program, or two
        block_m, block_n = max(8, triton.next_power_of_2(group * q_len)), mma.block_keys(dim)
        launch = (
            query.device.index, dim, k_bits, v_bits, block_m, group, q_len, kv_heads, padded,
            key_mean is not None, value_mean is not None,
        )  # fmt: skip
        plan = register_launch(  # with the first call's estimates until a compiled kernel's registers say
            mma, batch, kv_heads, tokens, dim, k_bits, v_bits, group * q_len, sms=_sm_count(query.device.index),
            resident=_RESIDENT.get(launch, mma.PROGRAMS_PER_SM),
            two_warp_resident=_RESIDENT.get((*launch, 2), mma.TWO_WARP_PROGRAMS_PER_SM),
            shared_per_sm=_shared_per_sm(query.device.index), num_splits=num_splits, static_launch=static_launch,
        )  # fmt: skip
        chunk, splits, warps, lookup_keys = plan.chunk, plan.splits, plan.warps, plan.lookup_keys
    else:
        block_m, block_n = max(16, triton.next_power_of_2(group * q_len)), BLOCK_N
        blocks = triton.cdiv(tokens, BLOCK_N)
        if num_splits is None:
            sms = _sm_count(query.device.index) if query.is_cuda else 4
            num_splits = min(triton.cdiv(CTAS_PER_SM * sms, batch * kv_heads), blocks // MIN_BLOCKS_PER_SPLIT)
        chunk, splits = _chunks(tokens, blocks, block_n, num_splits, static_launch)
        warps, lookup_keys = 1, False
    launch_merge = (
        PROGRAMMATIC_LAUNCH and gdc_wait is not None and splits > 1 and _PTX and query.is_cuda
        and _has_programmatic_launch(query.device.index)
    )  # fmt: skip
    lengths = lengths.to(device=query.device, dtype=torch.int32)
    starts = starts.to(device=query.device, dtype=torch.int32) if padded else lengths
    out_dim = 2 * dim if value_sketch is not None else dim  # Prod values: their weighted signs follow
    part_out = torch.empty(
        batch * kv_heads * splits * block_m, out_dim, dtype=torch.float32, device=query.device
    )
    part_lse = torch.empty(batch * kv_heads * splits * block_m, dtype=torch.float32, device=query.device)
    arguments = (
        query, key_indices, key_norms, value_indices, value_norms, key_table, value_table, lengths, starts,
        part_out, part_lse, scaling * math.log2(math.e), chunk, splits, causal_shift,
        *query.stride()[:3], *key_indices.stride()[:2], *key_norms.stride()[:2],
        *value_indices.stride()[:2], *value_norms.stride()[:2],
    )  # fmt: skip
    shape = dict(
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, DIM=dim, K_BITS=k_bits, V_BITS=v_bits, PADDED=padded,
        KEY_MEAN=key_mean is not None, VALUE_MEAN=value_mean is not None, LAUNCH_MERGE=launch_merge,
    )  # fmt: skip
    means = dict(  # the query stands in for an absent mean, which the kernels do not read
        key_mean=query if key_mean is None else key_mean,
        value_mean=query if value_mean is None else value_mean,
    )
    if mma:
        kernel = mma._attend_chunk_mma[(batch * kv_heads, splits)](
            *arguments, **means, **shape, ROWS=block_m, BLOCK_N=block_n, LOOKUP_KEYS=lookup_keys, WARPS=warps,
            **{**mma.LAUNCH, "num_warps": warps},
        )  # fmt: skip
        if launch not in _RESIDENT and warps == 1:  # one-warp programs: what the chunks are sized for
            _RESIDENT[launch] = _resident_programs(
                query.device.index, kernel.n_regs, mma.PROGRAMS_PER_SM, kernel.metadata.shared
            )
        if (*launch, 2) not in _RESIDENT and warps == 2:  # each warp takes its registers in an SM quarter
            _RESIDENT[(*launch, 2)] = (
                _resident_programs(
                    query.device.index,
                    kernel.n_regs,
                    2 * mma.TWO_WARP_PROGRAMS_PER_SM,
                    kernel.metadata.shared,
                )
                // 2
            )
    else:
        _attend_chunk[(batch * kv_heads, splits)](
            *arguments, *_sketch_arguments(query, key_sketch, value_sketch), **means, **shape, BLOCK_M=block_m,
            BLOCK_N=block_n, PERMUTE=_PTX and query.is_cuda, K_SKETCH=key_sketch is not None,
            V_SKETCH=value_sketch is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
    # One chunk per sequence: nothing to merge, its rows are the output (what the merge would write).
    if splits == 1:
        rows = group * q_len
        out = part_out.view(batch, kv_heads, block_m, out_dim)[:, :, :rows].reshape(
            batch, q_heads, q_len, out_dim
        )
        # natural-log LSE, scaled and copied out of the padded rows in one kernel
        lse = part_lse.view(batch, kv_heads, block_m)[:, :, :rows] * math.log(2)
        return _with_value_sketch(out, value_sketch), lse.reshape(batch, q_heads, q_len)
    out = torch.empty(batch, q_heads, q_len, out_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    # slices in parallel on a GPU; one program per row in the interpreter, whose cost is per program
    merge_dims = min(out_dim, MERGE_DIMS) if query.is_cuda else out_dim
    _merge_chunks[(batch * kv_heads, group * q_len, out_dim // merge_dims)](
        part_out, part_lse, out, lse, splits, *out.stride()[:3],
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, DIM=out_dim, BLOCK_M=block_m,
        BLOCK_S=max(16, min(MERGE_SPLITS, triton.next_power_of_2(splits))), BLOCK_D=merge_dims,
        WAIT=launch_merge, **({"launch_pdl": True} if launch_merge else {}),  # ROCm's triton takes no launch_pdl
    )  # fmt: skip
    return _with_value_sketch(out, value_sketch), lse


def _sketch_arguments(
    query: torch.Tensor, key_sketch: QJLSketch | None, value_sketch: QJLSketch | None
) -> tuple:
    """`_attend_chunk`'s Prod arguments: the queries' projections S Πq (fp32, one S per KV head) and each
    side's sign and residual-norm tensors with their strides (dummies where a side has none)."""
    dummy = QJLSketch(query, query, query, 0.0)  # a side without a sketch: the kernel reads none of it
    k, v, q_sketch = key_sketch or dummy, value_sketch or dummy, query
    if key_sketch is not None:
        batch, q_heads, q_len, dim = query.shape
        q = query.float().reshape(batch, key_sketch.projection.shape[0], -1, q_len, dim)
        q_sketch = torch.einsum("bhgtd,hed->bhgte", q, key_sketch.projection).reshape(query.shape)
    return (
        q_sketch, k.signs, k.residual_norms, v.signs, v.residual_norms, k.scale,
        *q_sketch.stride()[:3], *k.signs.stride()[:2], *k.residual_norms.stride()[:2],
        *v.signs.stride()[:2], *v.residual_norms.stride()[:2],
    )  # fmt: skip


def _with_value_sketch(out: torch.Tensor, value_sketch: QJLSketch | None) -> torch.Tensor:
    """The rotated-domain output: with Prod values, the weighted sum of their signs (the second half) times
    √(π/2)/d · S of each query head's KV head, added to the Stage-1 part."""
    if value_sketch is None:
        return out
    batch, q_heads, q_len, width = out.shape
    dim, kv_heads = width // 2, value_sketch.projection.shape[0]
    signs = out[..., dim:].reshape(batch, kv_heads, -1, q_len, dim)
    sketch = torch.einsum("bhgtm,hmd->bhgtd", signs, value_sketch.projection).reshape(
        batch, q_heads, q_len, dim
    )
    return out[..., :dim] + value_sketch.scale * sketch
