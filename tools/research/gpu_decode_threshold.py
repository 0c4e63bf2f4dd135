"""Which decode kernel serves the shapes around `decode.REGISTER_KERNEL_MIN_KEYS`: the Triton-language kernel
(four warps per program) or the register-fragment one (one warp per program), each forced, beside SDPA.

    PYTHONPATH=src:benchmarks python tools/research/gpu_decode_threshold.py

Each row: a batch, head layout and context whose keys × KV heads × sequences lie on either side of the
threshold; µs of the replayed step (median of 30, L2 flushed, as benchmarks/gpu_decode.py times it) with each
kernel, rounds alternating, and the library's choice marked.
"""

from __future__ import annotations

import argparse

import torch
from gpu_decode import bench, bf16_times, decode_inputs

from tqlab.kernels import decode, decode_attention

SHAPES = [
    (1, 12, 2, 4096), (1, 12, 2, 8192), (1, 12, 2, 16384), (1, 12, 2, 32768), (1, 12, 2, 65536),
    (1, 32, 8, 2048), (1, 32, 8, 4096), (1, 32, 8, 8192), (1, 32, 8, 16384), (4, 12, 2, 4096),
]  # fmt: skip
FORCED = {"Triton-language": 1 << 62, "register": 0}  # REGISTER_KERNEL_MIN_KEYS that forces each


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    library = decode.REGISTER_KERNEL_MIN_KEYS
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; threshold {library} keys × heads")
    print(
        "| batch | heads | context | keys × KV heads × sequences | bits | SDPA µs | "
        + " | ".join(f"{k} µs" for k in FORCED)
        + " |"
    )
    print("| --- " * (6 + len(FORCED)) + "|")
    for batch, q_heads, kv_heads, context in SHAPES:
        sdpa, _ = bf16_times(batch, q_heads, kv_heads, context, flex=False)
        for bits in args.bits:
            inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
            times = {name: [] for name in FORCED}
            for _ in range(args.rounds):
                for name, threshold in FORCED.items():
                    decode.REGISTER_KERNEL_MIN_KEYS = threshold
                    times[name].append(bench(lambda i=inputs: decode_attention(*i)[0]))
            decode.REGISTER_KERNEL_MIN_KEYS = library
            chosen = "register" if batch * kv_heads * context >= library else "Triton-language"
            cells = [
                " / ".join(f"{t:.1f}" for t in ts) + (" (chosen)" if name == chosen else "")
                for name, ts in times.items()
            ]
            print(f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | {batch * kv_heads * context} | {bits} | "
                  f"{sdpa:.1f} | " + " | ".join(cells) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
