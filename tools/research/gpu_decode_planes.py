"""Experiment behind docs/benchmarks.md ("GPU speed: where the kernels stand"): decode-attention variants that
keep codes in bit-plane order (eight K=d/8 tensor-core products instead of interleaving the planes back into
coordinate order), and the same with an arithmetic stand-in for the codebook lookup (wrong values, timing only).

    PYTHONPATH=src python tools/research/gpu_decode_planes.py     # on a CUDA GPU; prints one line per case
"""
import math, statistics, sys, itertools
import torch, triton, triton.language as tl
import torch.nn.functional as F
sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import bench
from tqlab.kernels import centroid_table, decode_attention
from tqlab.kernels.decode import _merge_chunks, _sm_count
from tqlab.quant import TurboQuantMSE


@triton.jit
def _words(codes, tokens, valid, BITS: tl.constexpr, DIM: tl.constexpr):
    """[N, DIM/8] int32: group g of each row (8 codes of BITS bits)."""
    if BITS == 3:
        at = codes + tokens[:, None] * (DIM // 8 * 3) + 3 * tl.arange(0, DIM // 8)[None, :]
        w = tl.load(at, mask=valid[:, None], other=0).to(tl.int32)
        w |= tl.load(at + 1, mask=valid[:, None], other=0).to(tl.int32) << 8
        w |= tl.load(at + 2, mask=valid[:, None], other=0).to(tl.int32) << 16
    elif BITS == 4:
        rows = codes.to(tl.pointer_type(tl.int32)) + tokens[:, None] * (DIM // 8)
        w = tl.load(rows + tl.arange(0, DIM // 8)[None, :], mask=valid[:, None], other=0)
    else:
        rows = codes.to(tl.pointer_type(tl.int16)) + tokens[:, None] * (DIM // 8)
        w = tl.load(rows + tl.arange(0, DIM // 8)[None, :], mask=valid[:, None], other=0).to(tl.int32)
    return w


@triton.jit
def _plane(w, src, e: tl.constexpr, BITS: tl.constexpr, ARITH: tl.constexpr):
    mask: tl.constexpr = (1 << BITS) - 1
    code = (w >> (e * BITS)) & mask
    if ARITH:
        return (code.to(tl.float32) * 0.1 - 0.7).to(tl.float16)
    return tl.gather(src, code, axis=1)


@triton.jit
def _kernel(
    query, k_codes, k_norms, v_codes, v_norms, k_table, v_table, lengths, part_out, part_lse,
    scale_log2, chunk, splits, q_stride_b, q_stride_h, q_stride_t,
    kc_stride_b, kc_stride_h, kn_stride_b, kn_stride_h, vc_stride_b, vc_stride_h, vn_stride_b, vn_stride_h,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, Q_LEN: tl.constexpr, DIM: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ARITH: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // KV_HEADS, bh % KV_HEADS
    length = tl.load(lengths + b).to(tl.int32)
    start = split * chunk
    stop = tl.minimum(start + chunk, length)
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * Q_LEN
    head, token = h * GROUP + rows // Q_LEN, rows % Q_LEN
    P: tl.constexpr = DIM // 8
    pd = tl.arange(0, P) * 8
    q_at = (query + b.to(tl.int64) * q_stride_b + head * q_stride_h + token * q_stride_t)[:, None] + pd[None, :]
    m_ = row_valid[:, None]
    q0 = tl.load(q_at + 0, mask=m_, other=0.0) * scale_log2
    q1 = tl.load(q_at + 1, mask=m_, other=0.0) * scale_log2
    q2 = tl.load(q_at + 2, mask=m_, other=0.0) * scale_log2
    q3 = tl.load(q_at + 3, mask=m_, other=0.0) * scale_log2
    q4 = tl.load(q_at + 4, mask=m_, other=0.0) * scale_log2
    q5 = tl.load(q_at + 5, mask=m_, other=0.0) * scale_log2
    q6 = tl.load(q_at + 6, mask=m_, other=0.0) * scale_log2
    q7 = tl.load(q_at + 7, mask=m_, other=0.0) * scale_log2
    qs = tl.maximum(tl.maximum(tl.maximum(tl.max(tl.abs(q0), 1), tl.max(tl.abs(q1), 1)), tl.maximum(tl.max(tl.abs(q2), 1), tl.max(tl.abs(q3), 1))),
                    tl.maximum(tl.maximum(tl.max(tl.abs(q4), 1), tl.max(tl.abs(q5), 1)), tl.maximum(tl.max(tl.abs(q6), 1), tl.max(tl.abs(q7), 1))))
    qs = tl.where(qs > 0, qs, 1.0)
    q0 = (q0 / qs[:, None]).to(tl.float16); q1 = (q1 / qs[:, None]).to(tl.float16)
    q2 = (q2 / qs[:, None]).to(tl.float16); q3 = (q3 / qs[:, None]).to(tl.float16)
    q4 = (q4 / qs[:, None]).to(tl.float16); q5 = (q5 / qs[:, None]).to(tl.float16)
    q6 = (q6 / qs[:, None]).to(tl.float16); q7 = (q7 / qs[:, None]).to(tl.float16)
    last_key = length - Q_LEN + token
    kc = k_codes + b.to(tl.int64) * kc_stride_b + h.to(tl.int64) * kc_stride_h
    kn = k_norms + b.to(tl.int64) * kn_stride_b + h.to(tl.int64) * kn_stride_h
    vc = v_codes + b.to(tl.int64) * vc_stride_b + h.to(tl.int64) * vc_stride_h
    vn = v_norms + b.to(tl.int64) * vn_stride_b + h.to(tl.int64) * vn_stride_h
    ksrc = tl.load(k_table + tl.arange(0, 1 << K_BITS))
    vsrc = tl.load(v_table + tl.arange(0, 1 << V_BITS))
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    a0 = tl.zeros((BLOCK_M, P), tl.float32); a1 = tl.zeros((BLOCK_M, P), tl.float32)
    a2 = tl.zeros((BLOCK_M, P), tl.float32); a3 = tl.zeros((BLOCK_M, P), tl.float32)
    a4 = tl.zeros((BLOCK_M, P), tl.float32); a5 = tl.zeros((BLOCK_M, P), tl.float32)
    a6 = tl.zeros((BLOCK_M, P), tl.float32); a7 = tl.zeros((BLOCK_M, P), tl.float32)
    for block in range(start, stop, BLOCK_N):
        keys = block + tl.arange(0, BLOCK_N)
        kv_ = keys < stop
        kw = _words(kc, keys, kv_, K_BITS, DIM)
        ksrc2 = tl.broadcast_to(ksrc[None, :], (BLOCK_N, 1 << K_BITS))
        s = tl.dot(q0, tl.trans(_plane(kw, ksrc2, 0, K_BITS, ARITH)))
        s = tl.dot(q1, tl.trans(_plane(kw, ksrc2, 1, K_BITS, ARITH)), s)
        s = tl.dot(q2, tl.trans(_plane(kw, ksrc2, 2, K_BITS, ARITH)), s)
        s = tl.dot(q3, tl.trans(_plane(kw, ksrc2, 3, K_BITS, ARITH)), s)
        s = tl.dot(q4, tl.trans(_plane(kw, ksrc2, 4, K_BITS, ARITH)), s)
        s = tl.dot(q5, tl.trans(_plane(kw, ksrc2, 5, K_BITS, ARITH)), s)
        s = tl.dot(q6, tl.trans(_plane(kw, ksrc2, 6, K_BITS, ARITH)), s)
        s = tl.dot(q7, tl.trans(_plane(kw, ksrc2, 7, K_BITS, ARITH)), s)
        k_norm = tl.load(kn + keys, mask=kv_, other=0.0).to(tl.float32)
        s = s * qs[:, None] * k_norm[None, :]
        seen = kv_[None, :] & (keys[None, :] <= last_key[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_norm = tl.load(vn + keys, mask=kv_, other=0.0).to(tl.float32)
        pv = (p * v_norm[None, :]).to(tl.float16)
        vw = _words(vc, keys, kv_, V_BITS, DIM)
        vsrc2 = tl.broadcast_to(vsrc[None, :], (BLOCK_N, 1 << V_BITS))
        al = alpha[:, None]
        a0 = tl.dot(pv, _plane(vw, vsrc2, 0, V_BITS, ARITH), a0 * al)
        a1 = tl.dot(pv, _plane(vw, vsrc2, 1, V_BITS, ARITH), a1 * al)
        a2 = tl.dot(pv, _plane(vw, vsrc2, 2, V_BITS, ARITH), a2 * al)
        a3 = tl.dot(pv, _plane(vw, vsrc2, 3, V_BITS, ARITH), a3 * al)
        a4 = tl.dot(pv, _plane(vw, vsrc2, 4, V_BITS, ARITH), a4 * al)
        a5 = tl.dot(pv, _plane(vw, vsrc2, 5, V_BITS, ARITH), a5 * al)
        a6 = tl.dot(pv, _plane(vw, vsrc2, 6, V_BITS, ARITH), a6 * al)
        a7 = tl.dot(pv, _plane(vw, vsrc2, 7, V_BITS, ARITH), a7 * al)
        m_i = m_new
    part = (bh * splits + split) * BLOCK_M + rows
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o = part_out + part[:, None] * DIM + pd[None, :]
    tl.store(o + 0, a0 * inv); tl.store(o + 1, a1 * inv); tl.store(o + 2, a2 * inv); tl.store(o + 3, a3 * inv)
    tl.store(o + 4, a4 * inv); tl.store(o + 5, a5 * inv); tl.store(o + 6, a6 * inv); tl.store(o + 7, a7 * inv)
    lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
    tl.store(part_lse + part, tl.where(l_i > 0, lse, float("-inf")))


def planes_attention(query, ki, kn, vi, vn, kt, vt, lengths, scaling, block_n=128, warps=4, stages=2, arith=False, ctas=4):
    batch, q_heads, q_len, dim = query.shape
    kv_heads, tokens = ki.shape[1], ki.shape[2]
    kb, vb = ki.shape[-1] * 8 // dim, vi.shape[-1] * 8 // dim
    group = q_heads // kv_heads
    block_m = max(16, triton.next_power_of_2(group * q_len))
    blocks = triton.cdiv(tokens, block_n)
    num_splits = min(triton.cdiv(ctas * (_sm_count(query.device.index) if query.is_cuda else 2), batch * kv_heads), max(1, blocks // 2))
    chunk = triton.cdiv(blocks, max(1, min(num_splits, blocks))) * block_n
    splits = triton.cdiv(tokens, chunk)
    part_out = torch.empty(batch * kv_heads * splits * block_m, dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch * kv_heads * splits * block_m, dtype=torch.float32, device=query.device)
    _kernel[(batch * kv_heads, splits)](
        query, ki, kn, vi, vn, kt, vt, lengths, part_out, part_lse, scaling * math.log2(math.e), chunk, splits,
        *query.stride()[:3], *ki.stride()[:2], *kn.stride()[:2], *vi.stride()[:2], *vn.stride()[:2],
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, DIM=dim, K_BITS=kb, V_BITS=vb, BLOCK_M=block_m, BLOCK_N=block_n,
        ARITH=arith, num_warps=warps, num_stages=stages)
    out = torch.empty(batch, q_heads, q_len, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    _merge_chunks[(batch * kv_heads, group * q_len)](part_out, part_lse, out, lse, splits, *out.stride()[:3],
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, DIM=dim, BLOCK_M=block_m, BLOCK_S=16)
    return out


def main():
    DIM = 128
    cases = [(1, 32, 8, 131072), (16, 32, 8, 16384), (1, 12, 2, 131072), (16, 12, 2, 65536)]
    for (batch, qh, kvh, ctx), bits in itertools.product(cases, [4, 3, 2]):
        q = torch.randn(batch, qh, 1, DIM, device="cuda")
        codecs = [TurboQuantMSE(DIM, bits, rotation="fast_hadamard", seed=s).cuda() for s in (0, 1)]
        codes = [torch.randint(0, 256, (batch, kvh, ctx, DIM // 8 * bits), dtype=torch.uint8, device="cuda") for _ in range(2)]
        norms = [(torch.rand(batch, kvh, ctx, device="cuda") + 0.5).half() for _ in range(2)]
        tables = [centroid_table(c.centroids, sign_magnitude=bits == 4) for c in codecs]  # as the cache stores 4 bits
        lengths = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        args = (q, codes[0], norms[0], codes[1], norms[1], *tables, lengths, DIM**-0.5)
        qb = q.bfloat16()
        kk, vv = (torch.randn(batch, kvh, ctx, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        sdpa = bench(lambda: F.scaled_dot_product_attention(qb, kk, vv, scale=DIM**-0.5, enable_gqa=True))
        del kk, vv
        base_out = decode_attention(*args)[0]
        res = [f"b{batch} {qh}/{kvh} {ctx//1024}k K{bits}V{bits} sdpa {sdpa:.1f}", f"lib {bench(lambda: decode_attention(*args)):.1f}"]
        for bn, w, st, ar in [(128, 4, 2, False), (64, 4, 2, False), (64, 4, 3, False), (128, 8, 2, False), (64, 2, 2, False), (128, 4, 2, True)]:
            try:
                out = planes_attention(*args, block_n=bn, warps=w, stages=st, arith=ar)
                err = "" if ar else f" err{((out - base_out).abs().max() / base_out.abs().max()).item():.0e}"
                t = bench(lambda: planes_attention(*args, block_n=bn, warps=w, stages=st, arith=ar))
                res.append(f"P{bn}/{w}/{st}{'A' if ar else ''} {t:.1f}{err}")
            except Exception as e:
                res.append(f"P{bn}/{w}/{st} FAIL {type(e).__name__}: {str(e)[:80]}")
        print(" | ".join(res), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
