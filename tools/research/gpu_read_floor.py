"""About how fast a decode step built as the library's is (chunks, then a merge of their partial results) would be
if its decode cost nothing: a kernel that only reads each chunk's codes and norms, with the library's own launch
(the same programs over the same chunks), and writes a partial result of the same size, then the library's merge
of those partial results. An estimate, not a bound: a reader faster than this one would lower it. Each step replayed from a CUDA graph after an L2 flush as benchmarks/gpu_decode.py
times it, beside the library's step and SDPA over a bf16 cache.

    PYTHONPATH=src:benchmarks python tools/research/gpu_read_floor.py

The reading kernel XORs every word it loads into one value that its partial result depends on (so no load can be
left out) and tries blocks of 32 and 64 keys on 1, 2 and 4 warps; the fastest is shown. Its outputs are not the
attention: timing only.
"""

from __future__ import annotations

import argparse
import itertools
from unittest import mock

import torch
import triton
import triton.language as tl
from gpu_decode import bench, bf16_times, decode_inputs

from tqlab.kernels import decode, decode_attention
from tqlab.kernels.decode import gdc_launch_dependents

SHAPES = [(1, 12, 2, 32768), (1, 12, 2, 65536), (1, 12, 2, 131072), (1, 32, 8, 32768), (16, 12, 2, 32768)]


@triton.jit
def _read_chunk(
    k_codes, k_norms, v_codes, v_norms, part_out, part_lse, chunk, tokens,
    K_WORDS: tl.constexpr, V_WORDS: tl.constexpr, WORDS: tl.constexpr, ROWS: tl.constexpr,
    VALID_ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr, LAUNCH_MERGE: tl.constexpr,
):  # fmt: skip
    if LAUNCH_MERGE:
        gdc_launch_dependents()
    bh, split = tl.program_id(0), tl.program_id(1)
    start = split * chunk
    stop = tl.minimum(start + chunk, tokens)
    w = tl.arange(0, WORDS)[None, :]
    seen = tl.zeros([BLOCK_N], tl.int32)
    for block in range(start, stop, BLOCK_N):
        t = block + tl.arange(0, BLOCK_N)
        row = bh.to(tl.int64) * tokens + t
        valid = t < stop
        kw = tl.load(k_codes + row[:, None] * K_WORDS + w, mask=valid[:, None] & (w < K_WORDS), other=0)
        vw = tl.load(v_codes + row[:, None] * V_WORDS + w, mask=valid[:, None] & (w < V_WORDS), other=0)
        kn = tl.load(k_norms + row, mask=valid, other=0)
        vn = tl.load(v_norms + row, mask=valid, other=0)
        seen ^= tl.xor_sum(kw ^ vw, axis=1) ^ kn.to(tl.int32) ^ vn.to(tl.int32)
    value = tl.xor_sum(seen, axis=0).to(tl.float32)
    rows = tl.arange(0, ROWS)
    part = (bh * tl.num_programs(1) + split) * ROWS + rows
    out = tl.zeros([ROWS, DIM], tl.float32) + value
    tl.store(
        part_out + part[:, None] * DIM + tl.arange(0, DIM)[None, :], out, mask=(rows < VALID_ROWS)[:, None]
    )
    tl.store(part_lse + part, tl.zeros([ROWS], tl.float32) + value, mask=rows < VALID_ROWS)


def library_launch(inputs) -> tuple[int, int]:
    """(chunk, splits) of the library's register-kernel launch for these inputs, recorded from a call."""
    seen = []
    original = decode.register_launch

    def record(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    with mock.patch.object(decode, "register_launch", record):
        decode_attention(*inputs)
    return seen[-1].chunk, seen[-1].splits


def read_step(inputs, chunk: int, splits: int, block_n: int, warps: int, merge: bool):
    """The reading kernel over the library's chunks, then (merge) the library's merge of its partial results."""
    q, k_codes, k_norms, v_codes, v_norms = inputs[:5]
    batch, q_heads, q_len, dim = q.shape
    kv_heads, tokens = k_codes.shape[1], k_codes.shape[2]
    group = q_heads // kv_heads
    rows = max(8, triton.next_power_of_2(group * q_len))
    part_out = torch.empty(batch * kv_heads * splits * rows, dim, device=q.device)
    part_lse = torch.empty(batch * kv_heads * splits * rows, device=q.device)
    out = torch.empty(batch, q_heads, q_len, dim, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, device=q.device)
    k_words, v_words = k_codes.shape[-1] // 4, v_codes.shape[-1] // 4
    pdl = merge and decode.PROGRAMMATIC_LAUNCH and decode.gdc_wait is not None

    def step():
        _read_chunk[(batch * kv_heads, splits)](
            k_codes.view(torch.int32), k_norms.view(torch.int16), v_codes.view(torch.int32),
            v_norms.view(torch.int16), part_out, part_lse, chunk, tokens, K_WORDS=k_words, V_WORDS=v_words,
            WORDS=triton.next_power_of_2(max(k_words, v_words)), ROWS=rows, VALID_ROWS=group * q_len, DIM=dim,
            BLOCK_N=block_n, LAUNCH_MERGE=pdl, num_warps=warps,
        )  # fmt: skip
        if merge:
            decode._merge_chunks[(batch * kv_heads, group * q_len, dim // decode.MERGE_DIMS)](
                part_out, part_lse, out, lse, splits, *out.stride()[:3], KV_HEADS=kv_heads, GROUP=group,
                Q_LEN=q_len, DIM=dim, BLOCK_M=rows,
                BLOCK_S=max(16, min(decode.MERGE_SPLITS, triton.next_power_of_2(splits))),
                BLOCK_D=decode.MERGE_DIMS, WAIT=pdl, **({"launch_pdl": True} if pdl else {}),
            )  # fmt: skip

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    args = parser.parse_args()
    print(
        "| batch | q/KV heads | context | bits | chunks per KV head | SDPA bf16 µs | library step µs | "
        "reading only, then the merge µs | reading only µs | reading GB/s | library vs SDPA | "
        "reading and merge vs SDPA |"
    )
    print("|" + " --- |" * 12)
    for (batch, q_heads, kv_heads, context), bits in itertools.product(SHAPES, args.bits):
        sdpa, _ = bf16_times(batch, q_heads, kv_heads, context, flex=False)
        inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
        chunk, splits = library_launch(inputs)
        library = bench(lambda: decode_attention(*inputs))  # noqa: B023
        variants = list(itertools.product([32, 64], [1, 2, 4]))
        merged = min(bench(read_step(inputs, chunk, splits, n, w, merge=True)) for n, w in variants)
        alone = min(bench(read_step(inputs, chunk, splits, n, w, merge=False)) for n, w in variants)
        read = sum(t.numel() * t.element_size() for t in inputs[1:5])
        print(
            f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | K{bits}V{bits} | {splits} | {sdpa:.1f} | "
            f"{library:.1f} | {merged:.1f} | {alone:.1f} | {read / alone / 1e3:.0f} | {sdpa / library:.2f}× | "
            f"{sdpa / merged:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
