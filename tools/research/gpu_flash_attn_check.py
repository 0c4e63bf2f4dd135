"""Checks flash-attn builds (tools/flash_attn_build.sh) before their times are trusted: `flash_attn_with_kvcache`
of FlashAttention-2 and -3 over a bf16 cache with per-sequence lengths against an fp64 reference of the same
attention, beside bf16 SDPA's own error, at flash-attn's split heuristic and at a fixed split count.

    PYTHONPATH=.flash_attn python tools/research/gpu_flash_attn_check.py [--versions 2 3]

Prints max |Δ| relative to the output's scale; a sound build is within bf16 rounding, as SDPA is. Needs CUDA.
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F

DIM = 128
SHAPES = [(1, 12, 2, 32768), (16, 32, 8, 4096), (3, 32, 8, 5000)]  # batch, query heads, KV heads, tokens


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).abs().max() / reference.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    args = parser.parse_args()
    # FlashAttention-2's package, and FlashAttention-3's module as flash-attn's hopper/ installs it
    modules = {2: "flash_attn", 3: "flash_attn_interface"}
    kernels = {v: importlib.import_module(modules[v]).flash_attn_with_kvcache for v in args.versions}
    torch.manual_seed(0)
    print("| batch | q/KV heads | tokens | FlashAttention | splits | its max rel Δ | SDPA bf16 max rel Δ |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch, q_heads, kv_heads, tokens in SHAPES:
        q = torch.randn(batch, q_heads, 1, DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, kv_heads, tokens, DIM, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        lengths = torch.randint(tokens // 2, tokens + 1, (batch,), device="cuda", dtype=torch.int32)
        mask = (torch.arange(tokens, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
        reference = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
        )
        bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        sdpa = relative_error(bf16, reference)
        # flash-attn's layout: [batch, tokens, KV heads, dim]
        k_cache, v_cache = (x.transpose(1, 2).contiguous() for x in (k, v))
        for version, flash_attn_with_kvcache in kernels.items():
            for splits in (0, 32):  # 0: its own heuristic
                out = flash_attn_with_kvcache(
                    q.transpose(1, 2), k_cache, v_cache, cache_seqlens=lengths, softmax_scale=DIM**-0.5,
                    num_splits=splits,
                )  # fmt: skip
                error = relative_error(out.transpose(1, 2), reference)
                cells = [batch, f"{q_heads}/{kv_heads}", tokens, version, splits or "its heuristic"]
                print("| " + " | ".join(map(str, cells)) + f" | {error:.1e} | {sdpa:.1e} |")


if __name__ == "__main__":
    main()
