"""Decode-attention latency on a GPU: the fused Triton kernel over codes against SDPA over a bf16 cache.

    PYTHONPATH=src python benchmarks/gpu_decode.py                     # → outputs/bench/benchmarks.md
    PYTHONPATH=src python benchmarks/gpu_decode.py --out docs/benchmarks.md

One decode step (one query token per sequence) of one layer: every sequence holds `context` tokens.
The kernel reads packed K and V codes (random bytes: every byte is a valid code) and fp16 norms; SDPA
reads bf16 K and V with GQA, and so do FlexAttention with `--flex` (torch.compile'd) and FlashInfer's decode
kernels with `--flashinfer` (JIT-compiled on first use, which needs nvcc; the wheel and its tvm-ffi dependency
travel with the tree to a machine without a registry, docs/benchmarks.md), and flash-attn's flash_attn_with_kvcache
with `--flash-attn 2 3` (FlashAttention-2 and -3, built by tools/flash_attn_build.sh). Times are medians of CUDA-graph
replays (no Python or launch overhead, as in a served decode step) with the L2 cache flushed before each, so each step streams its cache from HBM. The query rotation and the output's
inverse rotation are not timed: both fold into the q and o projection weights. The PyTorch reference
path of attention over codes (per-KV-head loop, as in tqlab.cache.attention) is timed up to
`--reference-max` tokens, and its output checks the kernel's (max |Δ| relative to the output's scale).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from docs_section import write_gpu_section

from tqlab.kernels import centroid_table, decode_attention
from tqlab.kernels.packed import sign_magnitude
from tqlab.quant import MSECode, TurboQuantMSE

DIM = 128
FLUSH_BYTES = 512 * 2**20  # several times the H200's L2
# How L2 is flushed before each timed replay: "read" leaves it full of clean lines, as a layer's weights do in a
# model's step; "write" (as triton.testing.do_bench flushes, and this table did until 2026-12-04) leaves dirty
# lines whose write-back the timed kernel pays for, more the more it reads (up to about L2's size), which charged
# SDPA over a bf16 cache 3–9 µs more than the step over codes (docs/benchmarks.md, "How L2 is flushed before
# a timed step"). The research tools that import `bench` follow it: set gpu_decode.FLUSH_BY = "write" to time
# them as their documented runs before that date were timed.
FLUSH_BY = "read"


def reference_path(codecs, q, codes, norms, scaling):
    """attend()'s arithmetic for one step: fp32 scores from the key codes, softmax, values summed in the
    rotated domain (query already rotated, output left rotated, as for the kernel)."""
    k_codec, v_codec = codecs
    batch, q_heads, _, dim = q.shape
    kv_heads, tokens = codes[0].shape[1], codes[0].shape[2]
    group = q_heads // kv_heads
    out = torch.empty(batch, q_heads, 1, dim, dtype=torch.float32, device=q.device)
    for h in range(kv_heads):
        k = MSECode((batch, tokens), dim, k_codec.bits, codes[0][:, h], norms[0][:, h])
        v = MSECode((batch, tokens), dim, v_codec.bits, codes[1][:, h], norms[1][:, h])
        qh = q[:, h * group : (h + 1) * group].float().reshape(batch, group, dim)
        p = torch.softmax(qh @ k_codec.rotated_centroids(k).transpose(-1, -2) * scaling, dim=-1)
        out[:, h * group : (h + 1) * group] = (p @ v_codec.rotated_centroids(v)).view(batch, group, 1, dim)
    return out


def bench(fn, reps: int = 30, flush_by: str | None = None) -> float:
    """Median µs of fn replayed from a CUDA graph (no launch overhead, as in a served decode step), with
    the L2 cache flushed before each replay so that the step streams its cache from HBM, by reading or writing a
    buffer several times its size (`flush_by`, FLUSH_BY where None)."""
    flush_by = flush_by or FLUSH_BY
    if flush_by not in ("write", "read"):
        raise ValueError(f"flush_by={flush_by!r}: expected 'write' or 'read'")
    fn()  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
    ]
    for start, end in events:
        if flush_by == "write":
            flush.zero_()
        else:
            torch.sum(flush, dim=0, out=total)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3


# FlexAttention's split-K decoding kernel first; its general kernel where that one does not compile
FLEX_KERNELS = [None, {"FORCE_USE_FLEX_ATTENTION": True}]


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 64  # one compiled kernel per shape of the sweep
    return torch.compile(flex_attention, dynamic=False)


def checked_time(name: str, call, expected: torch.Tensor) -> float:
    """µs of `call` (NaN where it fails to compile or run, which is printed), after checking its output
    against SDPA's: a baseline that computes something else is no baseline."""
    try:
        error = (call().view_as(expected) - expected).abs().max() / expected.abs().max()
        time = bench(call)
    except Exception as exc:  # noqa: BLE001 — a kernel that does not compile is reported, not fatal
        lines = str(exc).splitlines() or [type(exc).__name__]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        print(f"{name} failed: {reason[:300]}")
        return float("nan")
    if not error <= 0.05:  # NaN included
        raise RuntimeError(f"{name} differs from SDPA by {error:.2g} of the output's scale")
    return time


def flex_time(q, k, v, scaling, expected) -> float:
    """µs of FlexAttention: its split-K decoding kernel, else its general kernel."""
    attend = compiled_flex_attention()
    for options in FLEX_KERNELS:
        call = functools.partial(attend, q, k, v, scale=scaling, enable_gqa=True, kernel_options=options)
        time = checked_time(f"FlexAttention {options or 'decoding'} kernel", call, expected)
        if time == time:
            return time
    return float("nan")


# tokens per page of FlashInfer's paged cache: its common default, and long pages
FLASHINFER_PAGES = (16, 128)


def fastest(kernel: str, calls: dict, expected: torch.Tensor) -> tuple[float, str]:
    """µs of the fastest of `calls` (name → call, each checked against SDPA's output by checked_time), and its
    name; every variant's time is printed, a variant that failed counts as never fastest."""
    times = {name: checked_time(f"{kernel} {name}", call, expected) for name, call in calls.items()}
    print(f"{kernel} µs: " + "; ".join(f"{name} {time:.1f}" for name, time in times.items()), flush=True)
    best = min(times, key=lambda name: times[name] if times[name] == times[name] else float("inf"))
    return times[best], best


def flashinfer_time(q, k, v, scaling, expected) -> tuple[float, str]:
    """µs of FlashInfer's fastest decode kernel over the same bf16 cache, and which it is: the batch decode
    on CUDA cores and on tensor cores over a paged cache (HND layout) of each of FLASHINFER_PAGES (each
    planned once, outside the timing, as a server plans once per step for all layers), and at batch 1 the
    single-request kernel over the contiguous cache."""
    import flashinfer

    batch, q_heads, _, dim = q.shape
    kv_heads, context = k.shape[1], k.shape[2]
    rows = q.view(batch, q_heads, dim)
    calls = {}
    for page in (page for page in FLASHINFER_PAGES if context % page == 0):
        pages = context // page
        # [batch, kv_heads, context, dim] → [batch · pages, kv_heads, page, dim]
        cache = tuple(
            x.view(batch, kv_heads, pages, page, dim)
            .transpose(1, 2)
            .reshape(batch * pages, kv_heads, page, dim)
            for x in (k, v)
        )
        indptr = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * pages
        indices = torch.arange(batch * pages, dtype=torch.int32, device=q.device)
        last_page = torch.full((batch,), page, dtype=torch.int32, device=q.device)
        for tensor_cores in (False, True):
            workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=q.device)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "HND", use_tensor_cores=tensor_cores
            )
            wrapper.plan(
                indptr, indices, last_page, q_heads, kv_heads, dim, page,
                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=scaling,
            )  # fmt: skip
            name = f"batch{', tensor cores' if tensor_cores else ''}, {page}-token pages"
            calls[name] = functools.partial(wrapper.run, rows, cache)
    if batch == 1:
        calls["single"] = functools.partial(
            flashinfer.single_decode_with_kv_cache, rows[0], k[0], v[0], kv_layout="HND", sm_scale=scaling
        )
    return fastest("FlashInfer", calls, expected)


# num_splits for flash_attn_with_kvcache: 0 is its own heuristic (what a caller gets by default), then fixed
FLASH_ATTN_SPLITS = (0, 4, 8, 16, 32, 64, 128)


def flash_attn_time(q, k, v, scaling, expected, version: int = 2) -> tuple[float, str]:
    """µs of flash-attn's `flash_attn_with_kvcache` over the same bf16 cache in its layout [batch, tokens, KV
    heads, dim], at its fastest of FLASH_ATTN_SPLITS, and which that is: FlashAttention-2 (the `flash_attn`
    package) or, with version 3, FlashAttention-3 (flash-attn's `hopper` build, module `flash_attn_interface`)."""
    if version == 3:
        from flash_attn_interface import flash_attn_with_kvcache
    else:
        from flash_attn import flash_attn_with_kvcache
    if q.shape[-1] != 128 or k.dtype != torch.bfloat16:  # what tools/flash_attn_build.sh builds
        raise ValueError(
            f"flash-attn as built here takes bf16 and head_dim 128, not {k.dtype} and {q.shape[-1]}"
        )

    rows = q.transpose(1, 2)  # [batch, 1, query heads, dim]
    k_cache, v_cache = (x.transpose(1, 2).contiguous() for x in (k, v))
    calls = {
        f"{splits} splits" if splits else "its split heuristic": functools.partial(
            flash_attn_with_kvcache, rows, k_cache, v_cache, softmax_scale=scaling, num_splits=splits
        )
        for splits in FLASH_ATTN_SPLITS
    }
    return fastest(f"FlashAttention-{version}", calls, expected)


def bf16_times(
    batch,
    q_heads,
    kv_heads,
    context,
    flex: bool = False,
    dim=DIM,
    flashinfer: bool = False,
    flash_attn: tuple[int, ...] = (),
) -> tuple[float, dict[str, float]]:
    """µs of SDPA, and of the other bf16 kernels asked for ("FlexAttention", "FlashInfer", and flash-attn's
    FlashAttention-2 and -3 for `flash_attn`'s versions) over the same cache."""
    scaling = dim**-0.5
    torch.manual_seed(0)
    q = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    shape = (batch, kv_heads, context, dim)
    k, v = (torch.randn(shape, device=q.device, dtype=torch.bfloat16) for _ in range(2))
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True))
    expected = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)
    others = {}
    if flex:
        others["FlexAttention"] = flex_time(q, k, v, scaling, expected)
    if flashinfer:
        others["FlashInfer"], _ = flashinfer_time(q, k, v, scaling, expected)
    for version in flash_attn:
        others[f"FlashAttention-{version}"], _ = flash_attn_time(q, k, v, scaling, expected, version)
    return sdpa, others


def decode_inputs(batch, q_heads, kv_heads, context, bits, dim=DIM, device="cuda"):
    """`decode_attention`'s arguments for one decode step over random codes (every byte a valid code; at 4 bits
    sign-magnitude labels, as the cache stores them: `codec_indices`), fp16 norms in [0.5, 1.5), one codec
    per side and an fp32 query (bf16-valued); and the two codecs."""
    codecs = [TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=s).to(device) for s in (0, 1)]
    shape = (batch, kv_heads, context)
    codes = [torch.randint(0, 256, (*shape, dim // 8 * bits), dtype=torch.uint8, device=device) for _ in "kv"]
    norms = [(torch.rand(shape, device=device) + 0.5).half() for _ in "kv"]
    q = torch.randn(batch, q_heads, 1, dim, device=device, dtype=torch.bfloat16).float()
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    tables = [centroid_table(c.centroids, sign_magnitude=bits == 4) for c in codecs]
    return (q, codes[0], norms[0], codes[1], norms[1], *tables, lengths, dim**-0.5), codecs


def codec_indices(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`decode_inputs`' codes as the codec's own indices (4-bit labels relabelled back)."""
    return sign_magnitude(codes) if bits == 4 else codes


def row(batch, q_heads, kv_heads, context, bits, reference_max, bf16) -> str:
    sdpa, others = bf16
    best = min([sdpa, *(t for t in others.values() if t == t)])
    inputs, codecs = decode_inputs(batch, q_heads, kv_heads, context, bits)
    qf, codes, norms, scaling = inputs[0], inputs[1:5:2], inputs[2:5:2], inputs[-1]
    call = lambda: decode_attention(*inputs)[0]  # noqa: E731
    ours = bench(call)
    read = sum(c.numel() + 2 * n.numel() for c, n in zip(codes, norms, strict=True))
    reference, error = "", ""
    if context <= reference_max:
        indices = [codec_indices(c, bits) for c in codes]
        expected = reference_path(codecs, qf, indices, norms, scaling)
        error = f"{((call() - expected).abs().max() / expected.abs().max()).item():.1e}"
        reference = f"{bench(lambda: reference_path(codecs, qf, indices, norms, scaling)):.0f}"
    return (
        f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | K{bits}V{bits} | {sdpa:.1f} | "
        + "".join(f"{time:.1f} | " for time in others.values())
        + f"{ours:.1f} | {sdpa / ours:.2f}× | "
        + (f"{best / ours:.2f}× | " if others else "")
        + f"{read / ours / 1e3:.0f} | {reference} | {error} |"
    )


def main() -> None:
    global FLUSH_BY
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layouts", nargs="+", default=["32/8", "12/2"], help="query heads/KV heads")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--reference-max", type=int, default=4096)
    parser.add_argument(
        "--flex",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="time FlexAttention too (torch 2.11 + Triton 3.6: its decoding kernel does not compile, the general "
        "one runs 2.5–32× slower than SDPA; docs/benchmarks.md)",
    )
    parser.add_argument(
        "--flashinfer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="time FlashInfer's decode kernels too (its fastest per shape; needs flashinfer and nvcc)",
    )
    parser.add_argument(
        "--flash-attn",
        type=int,
        nargs="+",
        choices=(2, 3),
        default=[],
        help="time flash-attn's flash_attn_with_kvcache too, FlashAttention-2 and/or -3 (its fastest split count "
        "per shape; PyPI has neither as a wheel: tools/flash_attn_build.sh builds them for a GPU machine "
        "without a compiler)",
    )
    parser.add_argument(
        "--flush-by", choices=("read", "write"), default=FLUSH_BY, help="how L2 is flushed before each replay"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    FLUSH_BY = args.flush_by
    flash_attn = tuple(dict.fromkeys(args.flash_attn))  # each version once
    others = [
        name for name, asked in (("FlexAttention", args.flex), ("FlashInfer", args.flashinfer)) if asked
    ]
    others += [f"FlashAttention-{version}" for version in flash_attn]
    columns = ["batch", "q/KV heads", "context", "bits", "SDPA bf16 µs", *(f"{name} bf16 µs" for name in others),
               "Triton codes µs", "vs SDPA", *(["vs best bf16"] if others else []), "codes GB/s",
               "PyTorch reference µs", "max rel Δ vs reference"]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    print("\n".join(rows), flush=True)
    for layout in args.layouts:
        q_heads, kv_heads = map(int, layout.split("/"))
        for batch in args.batches:
            for context in args.contexts:
                bf16 = bf16_times(
                    batch, q_heads, kv_heads, context, args.flex,
                    flashinfer=args.flashinfer, flash_attn=flash_attn,
                )  # fmt: skip
                torch.cuda.empty_cache()
                for bits in args.bits:
                    rows.append(row(batch, q_heads, kv_heads, context, bits, args.reference_max, bf16))
                    print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
    flushing = {"read": "reading", "write": "writing"}[FLUSH_BY]
    write_gpu_section(
        args.out, "gpu_decode", "Decode attention over codes on a GPU (one layer, one step, head_dim 128)",
        f"Median of CUDA-graph replays, L2 flushed before each by {flushing} a {FLUSH_BYTES >> 20} MiB buffer "
        "(docs/benchmarks.md, \"How L2 is flushed before a timed step\"); query and output rotations not timed "
        "(they fold into the projections).", rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
