"""Where an eager decode step's host time goes with TurboQuantCache (the path `model.generate` takes without
CUDA graphs): torch.profiler's CPU-side ops and CUDA runtime calls (synchronisations among them) over a few
steps, and cProfile's Python functions.

    PYTHONPATH=src python tools/research/gpu_eager_profile.py --arch Qwen2.5-Coder-1.5B --context 8192
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_generate import ARCHS, make_cache  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="Qwen2.5-Coder-1.5B")
    parser.add_argument("--cache", default="K4V4")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[args.arch], dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = torch.randint(0, vocab, (1, args.context), device="cuda")
    cache = make_cache(model, args.cache, args.context + 64)

    def step(token):
        return model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    token = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    for _ in range(4):
        token = step(token)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        token = step(token)
    torch.cuda.synchronize()
    print(
        f"{args.arch} {args.cache} {args.context}: {(time.perf_counter() - start) / args.steps * 1e3:.2f} ms/step"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            token = step(token)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        token = step(token)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
