"""KV-cache memory on a GPU: real tensor bytes and peak allocated memory of the compressed cache against a
bf16 one, for randomly initialised models of three real architectures (Llama-3.2-1B, Qwen2.5-Coder-1.5B and
the larger Llama-3.1-8B), contexts 4k–128k, batch 1 and 8, K/V bit splits and modes (keys only, int8 keys).

    PYTHONPATH=src python benchmarks/gpu_memory.py                     # → outputs/bench/benchmarks.md
    PYTHONPATH=src python benchmarks/gpu_memory.py --out docs/benchmarks.md

Each cache is filled the way a chunked prefill fills it — every layer's `update` takes `--chunk` tokens at a
time — with random bf16 keys and values and no attention: it measures what the cache stores (its tensors'
bytes), the peak memory building it takes above the model weights (encoding temporaries included), and from
those the longest context that fits the GPU at each batch size next to the weights. A cache that does not
fit is a row that says so (the allocator's out-of-memory error, caught). Attention's own transient buffers are
not included: what a decode step adds is measured by `gpu_generate.py`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from docs_section import write_section
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tqlab.cache import TurboQuantCache
from tqlab.kv import KVQuantSpec

ARCHS = {  # the shapes of the public configs (random weights: no hub on the GPU machine)
    "Llama-3.2-1B": LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    ),
    "Qwen2.5-Coder-1.5B": Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
    ),
}  # fmt: skip
CACHES = {  # name → KVQuantSpec.create options (TurboQuant-MSE, fast Hadamard); bf16: transformers' cache
    "bf16": None,
    "K4V4": dict(bits=4),
    "K3V3": dict(bits=3),
    "K2V2": dict(bits=2),
    "K4V2": dict(bits=4, v_bits=2),
    "K3, V bf16": dict(bits=3, compress=("key",)),
    "K int8, V3": dict(bits=3, k_bits=8, k_codec="int8_block"),
}
MiB = 2**20


def fill(config, spec, batch: int, context: int, chunk: int) -> tuple[int, int] | None:
    """(stored bytes, peak bytes above what was allocated before) of one cache filled to `context` tokens;
    None when it does not fit in the GPU's memory."""
    text = config.get_text_config(decoder=True)
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cache = TurboQuantCache.from_spec(config, spec)
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            for layer in range(text.num_hidden_layers):
                k, v = (
                    torch.randn(batch, heads, n, dim, generator=g, device="cuda", dtype=torch.bfloat16)
                    for _ in "kv"
                )
                cache.append(k, v, layer)
        stored = cache.nbytes()["stored"]
        torch.cuda.synchronize()
        result = stored, torch.cuda.max_memory_allocated() - base
    except torch.OutOfMemoryError:
        result = None
    del cache
    k = v = None
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_memory.py needs a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    lines = [
        "## GPU memory of the KV cache",
        "",
        f"`PYTHONPATH=src python benchmarks/gpu_memory.py` — {datetime.date.today()}, "
        f"{torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB), torch {torch.__version__}. Random-weight "
        "models of the public architectures (bf16), caches filled by chunked `update` calls of "
        f"{args.chunk} tokens with random bf16 K/V; TurboQuant-MSE + fast Hadamard on every layer (K and V "
        "unless the cache's name says otherwise; int8 keys: the int8_block codec). Stored: the cache's tensor "
        "bytes; peak: allocated memory above the weights while filling it; OOM: the allocator ran out.",
        "",
        "| model | weights (MiB) | cache | batch | context | stored (MiB) | bytes/token | peak (MiB) | vs bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fits = ["", "What fits beside the weights with 2 GiB kept free, from the stored bytes/token (constant in the "
            "context): tokens per sequence at batch 1, 8 and 64, and the largest batch at 32k and 128k tokens "
            "(a capacity: beyond 128k a context exceeds what these models were trained on):", "",
            "| model | cache | bytes/token | tokens, batch 1 | batch 8 | batch 64 | batch at 32k | batch at 128k |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in args.archs:
        config = ARCHS[name]
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        dim = config.hidden_size // config.num_attention_heads
        per_token = {}
        for cache_name in args.caches:
            options = CACHES[cache_name]
            spec = (
                None
                if options is None
                else KVQuantSpec.create(
                    codec="turboquant_mse", rotation="fast_hadamard", head_dim=dim, **options
                )
            )
            for batch in args.batches:
                for context in args.contexts:
                    filled = fill(config, spec, batch, context, args.chunk)
                    if filled is None:
                        lines.append(
                            f"| {name} | {weights / MiB:.0f} | {cache_name} | {batch} | {context} | OOM | | | |"
                        )
                        print(lines[-1], flush=True)
                        continue
                    stored, peak = filled
                    tokens = batch * context
                    per_token[cache_name] = stored / tokens
                    ratio = per_token["bf16"] / per_token[cache_name] if "bf16" in per_token else 1.0
                    lines.append(
                        f"| {name} | {weights / MiB:.0f} | {cache_name} | {batch} | {context} | {stored / MiB:.0f} "
                        f"| {stored / tokens:.0f} | {peak / MiB:.0f} | {ratio:.2f}× |"
                    )
                    print(lines[-1], flush=True)
            if cache_name in per_token:
                free = total - weights - 2 * 2**30
                sequence = free / per_token[cache_name]
                fits.append(
                    f"| {name} | {cache_name} | {per_token[cache_name]:.0f} | "
                    + " | ".join(f"{int(sequence / b):,}" for b in (1, 8, 64))
                    + f" | {int(sequence / 32768):,} | {int(sequence / 131072):,} |"
                )
        del model
        torch.cuda.empty_cache()
    table = "\n".join(lines + fits)
    print("\n".join(fits))
    if str(args.out) != "-":
        write_section(args.out, "GPU memory of the KV cache", table)


if __name__ == "__main__":
    main()
