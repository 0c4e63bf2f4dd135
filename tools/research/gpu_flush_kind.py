"""Does the way the decode table flushes L2 favour one side? SDPA over a bf16 cache and this library's step over
codes, each replayed from a CUDA graph after a flush that writes a buffer (the decode table's timer until
2026-12-04, as triton.testing.do_bench flushes: the dirty lines are written back while the step reads its cache)
and after one that reads it (its timer since: L2 left full of clean lines, as inside a model's step after a
layer's weights).

    PYTHONPATH=src:benchmarks python tools/research/gpu_flush_kind.py --bits 4 3

Prints µs per case and the speed-up over SDPA under each flush.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from gpu_decode import bench, decode_inputs

from tqlab.kernels import decode_attention

SHAPES = [
    (1, 12, 2, 32768), (1, 12, 2, 65536), (1, 12, 2, 131072), (1, 32, 8, 32768), (1, 32, 8, 131072),
    (16, 12, 2, 32768), (16, 32, 8, 32768),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--rounds", type=int, default=2, help="each case timed this many times, alternating")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| batch | q/KV heads | context | bits | SDPA, write flush | SDPA, read flush | codes, write flush | "
          "codes, read flush | vs SDPA, write flush | vs SDPA, read flush | largest spread between rounds |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, q_heads, kv_heads, context in SHAPES:
        torch.manual_seed(0)
        dim = 128
        q = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
        k, v = (
            torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)
        )
        sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, scale=dim**-0.5, enable_gqa=True)
        for bits in args.bits:
            inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
            codes = functools.partial(decode_attention, *inputs)
            times = {(name, by): [] for name in ("sdpa", "codes") for by in ("write", "read")}
            for _ in range(args.rounds):
                for (name, by), runs in times.items():
                    runs.append(bench(sdpa if name == "sdpa" else codes, flush_by=by))
            t = {key: min(runs) for key, runs in times.items()}  # each side's best round
            spread = max(max(r) / min(r) for r in times.values())
            print(f"| {batch} | {q_heads}/{kv_heads} | {context // 1024}k | K{bits}V{bits} | "
                  f"{t['sdpa', 'write']:.1f} | {t['sdpa', 'read']:.1f} | {t['codes', 'write']:.1f} | "
                  f"{t['codes', 'read']:.1f} | {t['sdpa', 'write'] / t['codes', 'write']:.2f}× | "
                  f"{t['sdpa', 'read'] / t['codes', 'read']:.2f}× | {100 * (spread - 1):.1f} % |",
                  flush=True)  # fmt: skip
            del inputs, codes
        del q, k, v, sdpa
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
