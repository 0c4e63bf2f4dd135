"""Decode speed and cache bytes of SmolLM2 with the compressed cache against its uncompressed cache (CPU).

    python benchmarks/cache_decode.py                          # → outputs/bench/benchmarks.md
    python benchmarks/cache_decode.py --out docs/benchmarks.md

For each context length: prefill a prompt of Wikipedia text (the gensim excerpt), then time `--new-tokens` greedy decode steps (best of
`--repeats`), with transformers' SDPA over an uncompressed cache and with the PyTorch reference of attention
over codes. This path is the correctness reference, not the fast one: it is expected to be slower than
SDPA on CPU; fused kernels are what make codes pay on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from docs_section import write_section

from tqlab.cache import compress_kv
from tqlab.capture.models import load_model
from tqlab.capture.text import wiki_documents
from tqlab.kv import KVQuantSpec


def decode_time(model, ids: torch.Tensor, spec, new_tokens: int, repeats: int) -> tuple[float, int]:
    """(seconds per decoded token, cache bytes stored at the end)."""
    best, stored = float("inf"), 0
    for _ in range(repeats):
        cache = compress_kv(model, spec)
        with torch.no_grad():
            out = model(ids, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            best = min(best, (time.perf_counter() - start) / new_tokens)
        stored = cache.nbytes()["stored"]
    return best, stored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    text = " ".join(d.text for d in wiki_documents()[:20])
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [
        "| context | cache | decode ms/token | cache MiB at the end | bytes vs uncompressed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for context in args.contexts:
        ids = torch.tensor(all_ids[:context])[None]
        base, base_bytes = decode_time(model, ids, None, args.new_tokens, args.repeats)
        rows.append(
            f"| {context} | uncompressed (fp32, SDPA) | {base * 1e3:.1f} | {base_bytes / 2**20:.2f} | 1.00 |"
        )
        for bits in args.bits:
            spec = KVQuantSpec.create("turboquant_mse", bits, "fast_hadamard", compress=("key", "value"))
            t, stored = decode_time(model, ids, spec, args.new_tokens, args.repeats)
            rows.append(
                f"| {context} | TurboQuant-MSE K{bits}V{bits} + Hadamard (reference path) | {t * 1e3:.1f} | "
                f"{stored / 2**20:.2f} | {stored / base_bytes:.3f} |"
            )
        print("\n".join(rows), flush=True)
    command = "python " + " ".join(sys.argv)
    section = "\n".join(
        [
            "## Decode with the compressed cache on CPU (SmolLM2-135M)",
            "",
            f"`{command}` — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {args.threads} threads, greedy decode of {args.new_tokens} tokens after "
            f"a Wikipedia prompt, best of {args.repeats}. The compressed rows run the PyTorch reference of "
            "attention over codes (per-head Python loop, centroids gathered per step): correctness first; "
            "fused kernels are the speed path.",
            "",
            *rows,
        ]
    )
    if str(args.out) != "-":
        write_section(args.out, "cache_decode", section)


if __name__ == "__main__":
    main()
