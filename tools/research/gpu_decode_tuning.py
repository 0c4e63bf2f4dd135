"""Experiment behind docs/benchmarks.md ("GPU speed: where the kernels stand"): the library decode kernel at
other block sizes, warps, pipeline stages and CTAs per SM, and a variant with keys on the MMA's M axis
(sᵀ = K qᵀ, oᵀ = Vᵀ pᵀ: the decoded tile is the register operand).

    PYTHONPATH=src python tools/research/gpu_decode_tuning.py     # on a CUDA GPU; prints one line per case
"""
import math, sys, itertools
import torch, triton, triton.language as tl
import torch.nn.functional as F
sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import bench
import tqlab.kernels.decode as lib
from tqlab.kernels import centroid_table, decode_attention
from tqlab.kernels.decode import _merge_chunks, _sm_count
from tqlab.kernels.packed import decode_table, load_centroids
from tqlab.quant import TurboQuantMSE


@triton.jit
def _swap(
    query, k_codes, k_norms, v_codes, v_norms, k_table, v_table, lengths, part_out, part_lse,
    scale_log2, chunk, splits, q_stride_b, q_stride_h, q_stride_t,
    kc_stride_b, kc_stride_h, kn_stride_b, kn_stride_h, vc_stride_b, vc_stride_h, vn_stride_b, vn_stride_h,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, Q_LEN: tl.constexpr, DIM: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // KV_HEADS, bh % KV_HEADS
    length = tl.load(lengths + b).to(tl.int32)
    start = split * chunk
    stop = tl.minimum(start + chunk, length)
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * Q_LEN
    head, token = h * GROUP + rows // Q_LEN, rows % Q_LEN
    dims = tl.arange(0, DIM)
    q_at = query + b.to(tl.int64) * q_stride_b + head * q_stride_h + token * q_stride_t
    q = tl.load(q_at[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * scale_log2
    q_scale = tl.max(tl.abs(q), axis=1)
    q_scale = tl.where(q_scale > 0, q_scale, 1.0)
    qT = tl.trans((q / q_scale[:, None]).to(tl.float16))  # [DIM, M]
    last_key = length - Q_LEN + token
    kc = k_codes + b.to(tl.int64) * kc_stride_b + h.to(tl.int64) * kc_stride_h
    kn = k_norms + b.to(tl.int64) * kn_stride_b + h.to(tl.int64) * kn_stride_h
    vc = v_codes + b.to(tl.int64) * vc_stride_b + h.to(tl.int64) * vc_stride_h
    vn = v_norms + b.to(tl.int64) * vn_stride_b + h.to(tl.int64) * vn_stride_h
    k_codebook = decode_table(k_table, K_BITS)  # the gather lookups (no byte permutes: the library's 4-bit
    v_codebook = decode_table(v_table, V_BITS)  # path has them since; compare it with PERMUTE off)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    accT = tl.zeros((DIM, BLOCK_M), tl.float32)
    for block in range(start, stop, BLOCK_N):
        keys = block + tl.arange(0, BLOCK_N)
        key_valid = keys < stop
        k = load_centroids(kc, k_codebook, keys, key_valid, K_BITS, DIM)
        k_norm = tl.load(kn + keys, mask=key_valid, other=0.0).to(tl.float32)
        sT = tl.dot(k, qT) * k_norm[:, None] * q_scale[None, :]  # [N, M]
        seen = key_valid[:, None] & (keys[:, None] <= last_key[None, :])
        sT = tl.where(seen, sT, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sT, axis=0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        pT = tl.exp2(sT - m_shift[None, :])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(pT, axis=0)
        v = load_centroids(vc, v_codebook, keys, key_valid, V_BITS, DIM)
        v_norm = tl.load(vn + keys, mask=key_valid, other=0.0).to(tl.float32)
        accT = tl.dot(tl.trans(v), (pT * v_norm[:, None]).to(tl.float16), accT * alpha[None, :])
        m_i = m_new
    part = (bh * splits + split) * BLOCK_M + rows
    tl.store(part_out + part[None, :] * DIM + dims[:, None], accT / tl.where(l_i > 0, l_i, 1.0)[None, :])
    lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
    tl.store(part_lse + part, tl.where(l_i > 0, lse, float("-inf")))


def swap_attention(query, ki, kn, vi, vn, kt, vt, lengths, scaling, block_n=128, warps=4, stages=2, ctas=4):
    batch, q_heads, q_len, dim = query.shape
    kv_heads, tokens = ki.shape[1], ki.shape[2]
    kb, vb = ki.shape[-1] * 8 // dim, vi.shape[-1] * 8 // dim
    group = q_heads // kv_heads
    block_m = max(16, triton.next_power_of_2(group * q_len))
    blocks = triton.cdiv(tokens, block_n)
    sms = _sm_count(query.device.index) if query.is_cuda else 2
    num_splits = min(triton.cdiv(ctas * sms, batch * kv_heads), max(1, blocks // 2))
    chunk = triton.cdiv(blocks, max(1, min(num_splits, blocks))) * block_n
    splits = triton.cdiv(tokens, chunk)
    part_out = torch.empty(batch * kv_heads * splits * block_m, dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch * kv_heads * splits * block_m, dtype=torch.float32, device=query.device)
    _swap[(batch * kv_heads, splits)](
        query, ki, kn, vi, vn, kt, vt, lengths, part_out, part_lse, scaling * math.log2(math.e), chunk, splits,
        *query.stride()[:3], *ki.stride()[:2], *kn.stride()[:2], *vi.stride()[:2], *vn.stride()[:2],
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, DIM=dim, K_BITS=kb, V_BITS=vb, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)
    out = torch.empty(batch, q_heads, q_len, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    _merge_chunks[(batch * kv_heads, group * q_len)](part_out, part_lse, out, lse, splits, *out.stride()[:3],
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, DIM=dim, BLOCK_M=block_m, BLOCK_S=16)
    return out


def lib_with(bn, warps, stages, ctas):
    def call(*args):
        old = lib.BLOCK_N, lib.NUM_WARPS, lib.NUM_STAGES, lib.CTAS_PER_SM
        lib.BLOCK_N, lib.NUM_WARPS, lib.NUM_STAGES, lib.CTAS_PER_SM = bn, warps, stages, ctas
        try:
            return decode_attention(*args)[0]
        finally:
            lib.BLOCK_N, lib.NUM_WARPS, lib.NUM_STAGES, lib.CTAS_PER_SM = old
    return call


def main():
    DIM = 128
    cases = [(1, 32, 8, 131072), (16, 32, 8, 16384), (1, 12, 2, 131072)]
    variants = [("lib", lib_with(128, 4, 2, 4))]
    variants += [(f"lib{bn}/{w}/{st}/{c}", lib_with(bn, w, st, c)) for bn, w, st, c in [(128, 2, 2, 4), (64, 2, 2, 4), (64, 4, 2, 4), (128, 4, 3, 4), (128, 4, 2, 8), (256, 4, 2, 4), (64, 1, 2, 8)]]
    variants += [(f"swap{bn}/{w}/{st}", lambda *a, bn=bn, w=w, st=st: swap_attention(*a, block_n=bn, warps=w, stages=st)) for bn, w, st in [(128, 4, 2), (64, 4, 2), (128, 8, 2), (64, 2, 2), (128, 4, 3)]]
    for (batch, qh, kvh, ctx), bits in itertools.product(cases, [4, 3]):
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
        base = decode_attention(*args)[0]
        res = [f"b{batch} {qh}/{kvh} {ctx//1024}k K{bits}V{bits} sdpa {sdpa:.1f}"]
        for name, fn in variants:
            try:
                err = ((fn(*args) - base).abs().max() / base.abs().max()).item()
                res.append(f"{name} {bench(lambda: fn(*args)):.1f}{'' if err < 1e-3 else f' ERR{err:.0e}'}")
            except Exception as e:
                res.append(f"{name} FAIL {type(e).__name__}")
        print(" | ".join(res), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
