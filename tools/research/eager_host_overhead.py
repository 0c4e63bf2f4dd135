"""Host time of an eager decode step through TurboQuantCache's kernel path, on this CPU machine, with the
Triton kernels (quantize, decode attention, and since 6b2aa53 the step's two ends) replaced by stubs that
return tensors of the right shape (so what is timed is the Python and the small PyTorch ops around them — what
a GPU waits on in an eager step — without the kernels' own launch costs).

    PYTHONPATH=src python tools/research/eager_host_overhead.py [--profile]

A tiny Llama-shaped model (4 layers, 32/8 heads, head_dim 64, hidden size 64: its own arithmetic negligible)
decodes one token at a time after a 64-token prompt; µs per layer per step (the best of 3 runs of 200 steps)
for TurboQuantCache K4V4 under both protocols and transformers' StaticCache and DynamicCache (SDPA), 1 thread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from tqlab.cache import compress_kv
from tqlab.kernels import decode as decode_module
from tqlab.kernels import step as step_module
from tqlab.kv import KVQuantSpec

LAYERS, PROMPT, STEPS = 4, 64, 200


def stub_kernels(monkeypatch_targets: list) -> None:
    """decode_attention, quantize_mse and the step's ends as shape-only stubs (their arithmetic is the GPU's,
    not the host's)."""

    def decode_attention(query, key_indices, *args, **kwargs):
        return torch.zeros_like(query, dtype=torch.float32), torch.zeros(query.shape[:-1])

    def quantize_mse(x, rotation, boundaries, norm_dtype=torch.float16, *args, **kwargs):
        bits = boundaries.numel().bit_length()
        codes = torch.zeros(*x.shape[:-1], x.shape[-1] // 8 * bits, dtype=torch.uint8)
        return codes, torch.ones(x.shape[:-1], dtype=norm_dtype)

    def rotate_queries(query, rotations):
        return torch.zeros_like(query, dtype=torch.float32)

    def finish_step(out, lse, rotations, query=None, keys=None, values=None, scaling=None, dtype=torch.float32):
        return torch.zeros_like(out, dtype=dtype)

    import tqlab.kernels as kernels

    for module, name, stub in [
        (decode_module, "decode_attention", decode_attention),
        (kernels, "quantize_mse", quantize_mse),
        (step_module, "rotate_queries", rotate_queries),
        (step_module, "finish_step", finish_step),
    ]:
        monkeypatch_targets.append((module, name, getattr(module, name)))
        setattr(module, name, stub)


def best_us(model, make_cache, profile: bool = False) -> float:
    return min(steps_us(model, make_cache(), profile and run == 0) for run in range(3))


def steps_us(model, cache, profile: bool = False) -> float:
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(5):
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        begin = time.perf_counter()
        for _ in range(STEPS):
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - begin
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return seconds / STEPS / LAYERS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the K4V4 prefill-exact steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    spec = KVQuantSpec.create("turboquant_mse", 4, "fast_hadamard", compress=("key", "value"), head_dim=64)
    restore: list = []
    stub_kernels(restore)
    print(
        f"torch {torch.__version__}, 1 thread; µs per layer per decode step (the model's own work included)"
    )
    print("| cache | µs |\n| --- | --- |")
    try:
        model.set_attn_implementation("sdpa")
        static = best_us(model, lambda: StaticCache(config=config, max_cache_len=PROMPT + STEPS + 8))
        print(f"| StaticCache | {static:.0f} |")
        print(f"| DynamicCache | {best_us(model, lambda: DynamicCache(config=config)):.0f} |")
        for protocol in ("all_quantized", "prefill_exact"):
            profile = args.profile and protocol == "prefill_exact"
            us = best_us(
                model, lambda p=protocol: compress_kv(model, spec, kernels="triton", protocol=p), profile
            )
            model.set_attn_implementation("sdpa")  # for the next cache of transformers' own
            print(f"| K4V4 {protocol} | {us:.0f} |")
    finally:
        for module, name, original in restore:
            setattr(module, name, original)


if __name__ == "__main__":
    main()
