"""Where an end-to-end decode step's time goes: host (Python) work per function and the GPU's kernel time.

    PYTHONPATH=src python tools/research/gpu_generate_profile.py --arch Llama-3.2-1B --context 65536 --batch 1

For each cache (bf16 StaticCache as the floor, TurboQuantCache K4V4 under both protocols): the wall time of a
decode step, the sum of the GPU's kernel times in it (torch.profiler), and the functions that take the most
host time (cProfile, cumulative and own), so that a step bound by host work shows which function does it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_memory import ARCHS  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

from tqlab.cache import compress_kv  # noqa: E402
from tqlab.capture.models import architecture_facts  # noqa: E402
from tqlab.kv import KVQuantSpec  # noqa: E402


def make_cache(model, kind: str, max_len: int):
    if kind == "bf16 static":
        model.set_attn_implementation("sdpa")
        return StaticCache(config=model.config, max_cache_len=max_len)
    bits, protocol = int(kind[1]), kind.split()[1]
    dim = architecture_facts(model.config)["head_dim"]  # Qwen2's config has no head_dim
    spec = KVQuantSpec.create(
        "turboquant_mse", bits, "fast_hadamard", compress=("key", "value"), head_dim=dim
    )
    return compress_kv(model, spec, protocol=protocol, reserve_tokens=max_len)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="Llama-3.2-1B", choices=list(ARCHS))
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--caches", nargs="+", default=["bf16 static", "K4V4 prefill_exact", "K4V4 all_quantized"]
    )
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[args.arch], torch_dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    for kind in args.caches:
        prompt = torch.randint(0, vocab, (args.batch, args.context), device="cuda")
        cache = make_cache(model, kind, args.context + 4 * args.steps + 8)
        token = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)

        def step(token, cache=cache):
            return model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)

        for _ in range(4):
            token = step(token)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            token = step(token)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                token = step(token)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # op rows would count twice
        gpu = sum(e.device_time_total for e in kernels) / args.steps / 1e3
        syncs = sum(e.count for e in events if "Synchronize" in e.key) / args.steps
        copies = sum(e.count for e in events if "Memcpy" in e.key) / args.steps
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
        )
        print(f"\n## {kind}: {wall:.2f} ms per step (wall), GPU kernels {gpu:.2f} ms, {launches / args.steps:.0f} "
              f"launches, {copies:.0f} memory copies and {syncs:.1f} host syncs per step")  # fmt: skip
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            token = step(token)
        torch.cuda.synchronize()
        profiler.disable()
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
            print(text.getvalue()[-9000:])
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
