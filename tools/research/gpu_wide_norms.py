"""What bf16 or fp32 value norms cost a decode step: `decode_attention` over the same codes with the key and value
norms in fp16, bf16 and fp32, each replayed from a CUDA graph after an L2 flush (µs). At commit 85ce5ba wider
norms took the Triton-language kernel, which weighted values in fp32 (`tl.dot` on fp32 operands) where p·‖v‖
as an fp16 operand overflows past 65 504; that was not kept (docs/benchmarks.md, "Guards against hostile input,
timed"), and since 398698f every norm dtype takes the same kernel, the cache refusing value norms past 65 504.

    mkdir -p old && git archive 85ce5ba src | tar -x -C old
    PYTHONPATH=old/src:benchmarks python tools/research/gpu_wide_norms.py
"""

from __future__ import annotations

import torch
from gpu_decode import bench, decode_inputs

from tqlab.kernels import decode_attention

CASES = [(1, 12, 2, 32768), (1, 32, 8, 32768), (16, 32, 8, 32768), (1, 12, 2, 131072)]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| batch | q/KV heads | context | bits | fp16 norms µs | bf16 µs | fp32 µs | max rel Δ fp32 vs fp16 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, q_heads, kv_heads, context in CASES:
        for bits in (4, 3):
            inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
            times, outputs = [], []
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                args = list(inputs)
                args[2], args[4] = inputs[2].to(dtype), inputs[4].to(dtype)  # key and value norms
                call = lambda args=args: decode_attention(*args)[0]  # noqa: E731
                times.append(bench(call))
                outputs.append(call())
            delta = ((outputs[2] - outputs[0]).abs().max() / outputs[0].abs().max()).item()
            print(
                f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | K{bits}V{bits} | "
                + " | ".join(f"{t:.1f}" for t in times)
                + f" | {delta:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
