"""What a replayed decode step costs before it reads any cache: the floor under benchmarks/gpu_decode.py's timer.

    PYTHONPATH=src:benchmarks python tools/research/gpu_step_floor.py

Each row is timed as the decode table times a step (`gpu_decode.bench`: a CUDA-graph replay after an L2 flush,
median of 30): one one-element kernel and two in a row (a step of the library is two kernels, the attention
and the merge of its chunks); the library's step over 64 keys per sequence with the register kernel forced, in
one chunk (no merge) and in two; SDPA over a bf16 cache of 64 keys. Batch 1, head_dim 128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gpu_decode import bench, decode_inputs

from tqlab.kernels import decode, decode_attention

KEYS = 64


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| step | µs |\n| --- | --- |")
    x = torch.zeros(1, device="cuda")
    print(f"| one one-element kernel | {bench(lambda: x.add_(1)):.1f} |")
    print(f"| two one-element kernels | {bench(lambda: (x.add_(1), x.add_(1))):.1f} |")
    decode.REGISTER_KERNEL_MIN_KEYS = 0  # the register kernel, as at ≥ 32k
    for q_heads, kv_heads in ((12, 2), (32, 8)):
        inputs, _ = decode_inputs(1, q_heads, kv_heads, KEYS, 4)
        q = inputs[0].bfloat16()
        k, v = (
            torch.randn(1, kv_heads, KEYS, q.shape[-1], device="cuda", dtype=torch.bfloat16) for _ in "kv"
        )
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))  # noqa: B023
        for splits in (1, 2):
            step = bench(lambda s=splits, i=inputs: decode_attention(*i, num_splits=s)[0])
            print(f"| {q_heads}/{kv_heads} heads, K4V4 over {KEYS} keys, {splits} chunk(s) | {step:.1f} |")
        print(f"| {q_heads}/{kv_heads} heads, SDPA over {KEYS} bf16 keys | {sdpa:.1f} |")


if __name__ == "__main__":
    main()
