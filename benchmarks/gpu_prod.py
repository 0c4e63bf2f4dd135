"""TurboQuant-Prod on the Triton kernels: fused quantize throughput and decode-attention latency on a GPU,
against TurboQuant-MSE at the same bits per coordinate and SDPA over a bf16 cache.

    PYTHONPATH=src python benchmarks/gpu_prod.py                       # → outputs/bench/benchmarks.md
    PYTHONPATH=src python benchmarks/gpu_prod.py --out docs/benchmarks.md

Quantize: bf16 rows of fast-Hadamard codecs, timed as in gpu_quantize.py (GB/s of bf16 input, % of a
device-to-device copy); the codes are compared with `TurboQuantProd.quantize` on 65536 rows (Stage-1 index
bytes and sign bytes equal). Decode: one step of one layer as in gpu_decode.py (CUDA-graph replays, L2
flushed; random code bytes, head_dim 128), Prod keys and values against MSE codes of the same total width;
up to 4096 tokens the output is checked against the codecs' PyTorch path (`codec.score`, `dequantize`), timed
eagerly beside it (what a Prod layer ran before these kernels).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from docs_section import write_gpu_section
from gpu_decode import bench, bf16_times, decode_inputs
from gpu_quantize import seconds

from tqlab.kernels import decode_attention, quantize_mse, quantize_prod, quantize_tables
from tqlab.kernels.decode import QJLSketch
from tqlab.kernels.packed import centroid_table
from tqlab.quant import TurboQuantMSE, TurboQuantProd
from tqlab.quant.prod import ProdCode

DIM = 128


def quantize_rows(dims, widths, mib) -> list[str]:
    rows = [
        "| d | Prod bits | Prod GB/s | % of copy | MSE (same bits) % of copy | PyTorch codec GB/s | index bytes equal "
        "| sign bytes equal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(rows), flush=True)
    for dim in dims:
        x = torch.randn(mib * 2**20 // (2 * dim), dim, device="cuda", dtype=torch.bfloat16)
        copy_s = seconds(partial(torch.empty_like(x).copy_, x))
        for bits in widths:
            codec = TurboQuantProd(dim, bits, rotation="fast_hadamard").cuda()
            mse, matrix = codec.mse, codec.rotation.matrix()
            args = (x, matrix, mse.boundaries, codec.projection, mse.centroids)
            tables = quantize_tables(matrix, mse.boundaries, x.dtype, codec.projection, mse.centroids)
            ours = seconds(partial(quantize_prod, *args, tables=tables))
            same = ""
            if bits <= 4:  # MSE codes of the same width
                plain = TurboQuantMSE(dim, bits, rotation="fast_hadamard").cuda()
                plain_tables = quantize_tables(matrix, plain.boundaries, x.dtype)
                same = f"{100 * copy_s / seconds(partial(quantize_mse, x, matrix, plain.boundaries, tables=plain_tables)):.0f}%"
            sample = x[: 1 << 16]
            indices, signs, _, _ = quantize_prod(sample, *args[1:], tables=tables)
            code = codec.quantize(sample)
            reference = seconds(partial(codec.quantize, sample)) * x.shape[0] / sample.shape[0]
            rows.append(
                f"| {dim} | {bits} | {x.nbytes / ours / 1e9:.0f} | {100 * copy_s / ours:.0f}% | {same} | "
                f"{x.nbytes / reference / 1e9:.0f} | "
                f"{100 * (indices == code.indices).float().mean().item():.4f}% | "
                f"{100 * (signs == code.signs).float().mean().item():.4f}% |"
            )
            print(rows[-1], flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def prod_inputs(batch, q_heads, kv_heads, context, bits, dim=DIM, device="cuda"):
    """decode_attention's arguments over random Prod codes (Stage-1 bytes, sign bytes, fp16 norms and residual
    norms), one codec per side; and the codecs."""
    codecs = [TurboQuantProd(dim, bits, rotation="fast_hadamard", seed=s).to(device) for s in (0, 1)]
    shape = (batch, kv_heads, context)
    codes = [
        torch.randint(0, 256, (*shape, dim // 8 * (bits - 1)), dtype=torch.uint8, device=device) for _ in "kv"
    ]
    signs = [torch.randint(0, 256, (*shape, dim // 8), dtype=torch.uint8, device=device) for _ in "kv"]
    norms = [(torch.rand(shape, device=device) + 0.5).half() for _ in "kv"]
    residual = [(torch.rand(shape, device=device) * 0.4).half() for _ in "kv"]
    q = torch.randn(batch, q_heads, 1, dim, device=device, dtype=torch.bfloat16).float()
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    sketches = [
        QJLSketch(s, r, c.projection.expand(kv_heads, dim, dim).contiguous(), c.qjl_scale)
        for s, r, c in zip(signs, residual, codecs, strict=True)
    ]
    tables = [centroid_table(c.mse.centroids) for c in codecs]
    args = (q, codes[0], norms[0], codes[1], norms[1], *tables, lengths, dim**-0.5)
    return (
        args,
        dict(key_sketch=sketches[0], value_sketch=sketches[1]),
        codecs,
        (codes, signs, norms, residual),
    )


def prod_reference(codecs, q, fields, scaling):
    """The codecs' PyTorch path for one step: Prod scores (`score`), softmax, dequantized values (rotated)."""
    (codes, signs, norms, residual), (k_codec, v_codec) = fields, codecs
    batch, q_heads, _, dim = q.shape
    kv_heads, tokens = codes[0].shape[1], codes[0].shape[2]
    group = q_heads // kv_heads
    out = torch.empty(batch, q_heads, 1, dim, dtype=torch.float32, device=q.device)
    for h in range(kv_heads):
        k, v = (
            ProdCode(
                (batch, tokens),
                dim,
                c.bits,
                dim,
                codes[i][:, h],
                signs[i][:, h],
                norms[i][:, h],
                residual[i][:, h],
            )
            for i, c in enumerate(codecs)
        )
        qh = q[:, h * group : (h + 1) * group].float().reshape(batch, group, dim)
        # q is in the rotated domain, as the kernel takes it: back to the input domain for the codec
        p = torch.softmax(k_codec.score(k_codec.rotation.inverse(qh), k) * scaling, dim=-1)
        values = v_codec.rotation.apply(v_codec.dequantize(v))
        out[:, h * group : (h + 1) * group] = (p @ values).view(batch, group, 1, dim)
    return out


def decode_rows(layouts, batches, contexts, widths, reference_max) -> list[str]:
    columns = ["batch", "q/KV heads", "context", "bits (K = V)", "SDPA bf16 µs", "Prod µs", "MSE µs",
               "Prod vs SDPA", "Prod vs MSE", "codec path µs (eager)", "max rel Δ vs codec path"]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    print("\n".join(rows), flush=True)
    for layout in layouts:
        q_heads, kv_heads = map(int, layout.split("/"))
        for batch in batches:
            for context in contexts:
                sdpa, _ = bf16_times(batch, q_heads, kv_heads, context, flex=False)
                for bits in widths:
                    args, sketches, codecs, fields = prod_inputs(batch, q_heads, kv_heads, context, bits)
                    call = partial(decode_attention, *args, **sketches)
                    ours = bench(call)
                    mse = ""
                    if bits <= 4:
                        plain, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
                        mse = bench(partial(decode_attention, *plain))
                    error = reference = ""
                    if context <= reference_max:
                        path = partial(prod_reference, codecs, args[0], fields, args[-1])
                        expected = path()
                        error = f"{((call()[0] - expected).abs().max() / expected.abs().max()).item():.1e}"
                        reference = f"{seconds(path) * 1e6:.0f}"  # eager: its input checks sync the host
                    rows.append(
                        f"| {batch} | {layout} | {context // 1024}k | {bits} | {sdpa:.1f} | {ours:.1f} | "
                        + (f"{mse:.1f} | " if mse else " | ")
                        + f"{sdpa / ours:.2f}× | "
                        + (f"{mse / ours:.2f}× | " if mse else " | ")
                        + f"{reference} | {error} |"
                    )
                    print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument(
        "--bits", type=int, nargs="+", default=[3, 4, 5], help="Prod widths (Stage 1: one fewer)"
    )
    parser.add_argument("--mib", type=int, default=256, help="bf16 input per quantize call")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layouts", nargs="+", default=["32/8", "12/2"], help="query heads/KV heads")
    parser.add_argument("--reference-max", type=int, default=4096)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    rows = quantize_rows(args.dims, args.bits, args.mib)
    rows += ["", *decode_rows(args.layouts, args.batches, args.contexts, args.bits, args.reference_max)]
    write_gpu_section(
        args.out, "gpu_prod", "TurboQuant-Prod on the Triton kernels: quantize and decode attention",
        "Quantize: median of triton do_bench; decode: median of CUDA-graph replays with the L2 flushed, head_dim "
        "128, query and output rotations not timed.", rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
