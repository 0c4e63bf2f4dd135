"""Generation agreement: greedy continuations of held-out prompts with and without the compressed cache.

Per prompt: the position of the first token where the two continuations differ (`max_new_tokens` when they
never do) and the share of identical tokens before it. Greedy decoding makes both runs deterministic, so a
difference is the cache's doing.
"""

from __future__ import annotations

import torch

from ..cache import compress_kv


@torch.no_grad()
def compare_generation(
    model, prompt: torch.Tensor, spec, layout: dict, max_new_tokens: int, calibration=None
) -> dict:
    """prompt: [T] token ids; layout: the cache's `CacheLayout` fields. Returns the divergence position,
    agreement share and both continuations."""
    ids = prompt[None].to(model.device)
    # an explicit mask: from pad_token_id alone generate would mask every prompt token equal to it
    kw = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    reference = model.generate(ids, cache=compress_kv(model, None), **kw)[0, ids.shape[1] :]
    cache = compress_kv(model, spec, calibration, **layout)
    compressed = model.generate(ids, cache=cache, **kw)[0, ids.shape[1] :]
    cache.check_norms()  # a decode step's overflowing norm would have made its tokens come from NaN
    differ = (reference != compressed).nonzero()
    divergence = int(differ[0]) if len(differ) else max_new_tokens
    return {
        "divergence": divergence,
        "agreement": divergence / max_new_tokens,
        "reference": reference.tolist(),
        "compressed": compressed.tolist(),
    }
