"""The kernels of one replayed decode step, per kind and per layer: where a compressed step's time goes next to a
bf16 one's.

    PYTHONPATH=src:benchmarks python tools/research/gpu_step_kernels.py --arch Qwen2.5-Coder-1.5B --context 32768

Builds the random-weight model, prefills `--context` random tokens, warms the `GraphDecoder` up (the capture
among the warm-up steps), then records `--steps` replayed steps with torch.profiler (CUPTI traces the
kernels inside a graph) and prints, for each cache, every kernel name with its launches per step and its GPU
µs per step, and the step's wall time. Kernel time is the sum of the kernels' durations: kernels that
overlap (a merge launched while the attention runs) count twice, and the gaps between kernels not at all.

    PYTHONPATH=src:benchmarks python tools/research/gpu_step_kernels.py --caches K4V4 --context 32768 --one-warp --rounds 2

`--one-warp` runs each cache a second time with the register kernel's programs held to one warp
(`decode_mma.two_warps` refusing every shape, as before programs of two warps), alternating `--rounds` times:
what two warps change inside a whole step rather than in one layer's replay after an L2 flush. `--two-warps`
adds a run with two-warp programs wherever `decode_mma.two_warps` takes the shape, whether or not they fit one
wave (`decode.TWO_WARPS = "always"`), `--short-chunks` one with short two-warp chunks kept short wherever they fit
one wave, at any number of query rows (`decode_mma.TWO_WARP_LONGER_MIN_ROWS` out of reach, the launch before
6125913), and `--no-programmatic` one more of each with the merge launched after the attention
(`decode.PROGRAMMATIC_LAUNCH = False`).

    PYTHONPATH=src:benchmarks python tools/research/gpu_step_kernels.py --caches K4V4 --context 131072 --two-warps --no-programmatic --rounds 2
    PYTHONPATH=src:benchmarks python tools/research/gpu_step_kernels.py --caches K4V4 K2V2 --context 65536 --short-chunks --rounds 2
"""

from __future__ import annotations

import argparse
import collections
import itertools
import time
from unittest import mock

import torch
from gpu_generate import WARMUP, make_cache
from gpu_memory import ARCHS
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from tqlab.cache import GraphDecoder
from tqlab.kernels import decode, decode_mma


@torch.no_grad()
def step_kernels(model, kind: str, batch: int, context: int, steps: int) -> tuple[float, list]:
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = torch.randint(0, vocab, (batch, context), device="cuda")
    cache = make_cache(model, kind, context + WARMUP + 2 * steps + 2)
    decoder = GraphDecoder(model, cache)
    decoder.prefill(prompt, max_new_tokens=WARMUP + 2 * steps + 1)
    decoder.decode(WARMUP)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.decode(steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.decode(steps)
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.time_range.elapsed_us()
    rows = sorted(((n / steps, t / steps, name) for name, (n, t) in kernels.items()), key=lambda r: -r[1])
    del decoder, cache
    torch.cuda.empty_cache()
    return wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="Qwen2.5-Coder-1.5B", choices=sorted(ARCHS))
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--caches", nargs="+", default=["bf16 static unmasked", "K4V4"])
    parser.add_argument("--one-warp", action="store_true", help="each cache also with one-warp programs only")
    parser.add_argument(
        "--two-warps", action="store_true", help="each cache also with two warps wherever they apply"
    )
    parser.add_argument(
        "--short-chunks", action="store_true", help="each cache also with short two-warp chunks at any rows"
    )
    parser.add_argument(
        "--no-programmatic", action="store_true", help="each run also with the merge launched after"
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[args.arch], dtype=torch.bfloat16).cuda().eval()
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    library_rule, longer_min_rows = decode_mma.two_warps, decode_mma.TWO_WARP_LONGER_MIN_ROWS
    programs = [("library's programs", library_rule, "auto", longer_min_rows)]
    if args.one_warp:
        programs.append(("one-warp programs", lambda *shape, **options: False, "auto", longer_min_rows))
    if args.two_warps:
        programs.append(("two warps wherever they apply", library_rule, "always", longer_min_rows))
    if args.short_chunks:
        programs.append(("short two-warp chunks at any rows", library_rule, "auto", float("inf")))
    launches = [("the merge launched early", True)]
    if args.no_programmatic:
        launches.append(("the merge launched after", False))
    for _ in range(args.rounds):
        for kind in args.caches:
            variants = list(itertools.product(programs, launches))
            if kind.startswith("bf16"):  # no codes: the kernels' settings change nothing
                variants = variants[:1]
            for (label, rule, two_warps, min_rows), (launch, programmatic) in variants:
                with (
                    mock.patch.multiple(decode_mma, two_warps=rule, TWO_WARP_LONGER_MIN_ROWS=min_rows),
                    mock.patch.multiple(decode, TWO_WARPS=two_warps, PROGRAMMATIC_LAUNCH=programmatic),
                ):
                    wall, rows = step_kernels(model, kind, args.batch, args.context, args.steps)
                what = kind if kind.startswith("bf16") else f"{kind}, {label}, {launch}"
                print_step(args, layers, what, wall, rows)


def print_step(args, layers: int, what: str, wall: float, rows: list) -> None:
    total = sum(r[1] for r in rows)
    print(
        f"\n{args.arch}, batch {args.batch}, {args.context // 1024}k, {what}: step {wall:.0f} µs wall, "
        f"{total:.0f} µs of kernels, {sum(r[0] for r in rows):.0f} launches ({layers} layers)"
    )
    print("| launches per step | per layer | µs per step | µs per launch | kernel |")
    print("| --- | --- | --- | --- | --- |")
    for launches, micros, name in rows:
        print(
            f"| {launches:.0f} | {launches / layers:.2f} | {micros:.1f} | {micros / launches:.2f} | {name[:90]} |"
        )


if __name__ == "__main__":
    main()
