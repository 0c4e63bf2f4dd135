"""Perplexity and hidden-state metrics with the compressed cache in the loop, against the uncompressed cache.

For each held-out window of `context` tokens (windows advance by `stride` within a document, so a document
gives one or more windows) the model runs twice: with the uncompressed cache and with the compressed one,
feeding the window as a first chunk of `prefill` tokens and then chunks of `chunk_size` tokens. Under the
all-quantized protocol every chunking gives the same numbers (only the speed differs) unless the cache keeps
tokens exact by their position from the end — a recent window, or keys still waiting for a whole group of
tokens (KIVI, the relevance gate): a chunk's queries see what is exact after the whole chunk, where a query
decoded alone sees its own newest tokens exact. So the default (`first_chunk`) is one pass without those, and
token by token with them, as in generation. Under prefill-exact the first chunk is the prompt that attends to
itself exactly, and the tokens after it are decoded `chunk_size` at a time (1: as in generation), seeing the
prompt through its codes. Per window, in float64: the mean next-token negative
log-likelihood of both runs on the tokens past the first `context − stride` (scored once per document),
the mean KL of the next-token distributions, the next-token top-1 agreement, and per layer the cosine and
relative error of the residual-stream hidden states.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import registry
from ..cache import TurboQuantCache, compress_kv
from ..metrics.attention import cosine


@dataclasses.dataclass(frozen=True)
class Window:
    document: str
    start: int  # token offset in the document
    ids: torch.Tensor  # [context] token ids
    scored_from: int  # positions before this one are context already scored by the previous window


def windows(
    documents: list[tuple[str, list[int]]],
    context: int,
    stride: int,
    limit: int | None = None,
    per_document: int | None = None,
    min_tokens: int = 2,
) -> list[Window]:
    """Sliding windows per document (the usual strided perplexity): every token after a document's first is
    scored exactly once — within the first `per_document` windows of each document, when that is set (fewer
    windows from more documents make more independent units). A window shorter than `min_tokens` (a
    document's last, or a whole short document) is left out: under prefill-exact a window needs the prompt
    and two more tokens for one prediction that reads codes."""
    out = []
    for title, ids in documents:
        starts = range(0, max(1, len(ids) - context + stride), stride)
        for start in starts[:per_document]:
            chunk = ids[start : start + context]
            if len(chunk) < max(2, min_tokens):
                break
            out.append(Window(title, start, torch.tensor(chunk), 0 if start == 0 else context - stride))
            if start + context >= len(ids):
                break
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def _run(model, ids: torch.Tensor, cache, prefill: int, chunk_size: int):
    """Logits [T, V] (float64) and hidden states per layer [L+1, T, H] of one window, fed in chunks."""
    logits, hidden = [], []
    starts = [0, *range(prefill, ids.shape[-1], chunk_size)]
    for i, stop in zip(starts, [*starts[1:], ids.shape[-1]], strict=True):
        out = model(ids[None, i:stop], cache=cache, output_hidden_states=True, use_cache=True)
        logits.append(out.logits[0].double())
        hidden.append(torch.stack([h[0].double() for h in out.hidden_states]))
    return torch.cat(logits), torch.cat(hidden, dim=1)


def first_chunk(protocol: str, context: int, stride: int, recent_window: int, spec) -> int:
    """`perplexity.prefill`'s default: prefill-exact's prompt (context − stride, at least 1); all-quantized one
    pass (the whole window) where chunking changes nothing, else one token (see the module's docstring)."""
    if protocol == "prefill_exact":
        return max(1, context - stride)
    positional = recent_window > 0 or (
        spec is not None and spec.key is not None and registry.codec_rule(spec.key.codec.name).key_groups
    )
    return 1 if positional else context


@torch.no_grad()
def compare_window(
    model,
    window: Window,
    spec,
    layout: dict,
    prefill: int,
    chunk_size: int,
    calibration=None,
    cache=None,
) -> dict:
    """One window's metrics: reference (uncompressed) and compressed NLL, KL, top-1 agreement, hidden states.
    layout: the cache's `CacheLayout` fields (protocol, exact_layers, sink_tokens, recent_window). `cache`:
    another compressed cache to measure instead (it needs an `nbytes()` like TurboQuantCache's)."""
    ids = window.ids.to(model.device)
    reference = compress_kv(model, None)
    ref_logits, ref_hidden = _run(model, ids, reference, len(ids), len(ids))
    cache = cache if cache is not None else compress_kv(model, spec, calibration, **layout)
    logits, hidden = _run(model, ids, cache, min(prefill, len(ids)), chunk_size)
    if isinstance(cache, TurboQuantCache):  # chunks of one token are coded unchecked (`check_norms`)
        cache.check_norms()
    targets = ids[1:]
    # prefill-exact: what the prompt predicts about itself never sees a code, so only later tokens are scored
    first = max(window.scored_from - 1, 0, prefill - 1 if layout.get("protocol") == "prefill_exact" else 0)
    scored = slice(first, len(targets))
    log_ref, log_q = ref_logits[:-1].log_softmax(-1), logits[:-1].log_softmax(-1)
    nll_ref = -log_ref.gather(-1, targets[:, None])[:, 0][scored]
    nll = -log_q.gather(-1, targets[:, None])[:, 0][scored]
    kl = (log_ref.exp() * (log_ref - log_q)).sum(-1)[scored]
    top1 = (ref_logits[:-1].argmax(-1) == logits[:-1].argmax(-1)).double()[scored]
    layer_cos = cosine(ref_hidden, hidden)[:, scored]  # [L+1, n]
    layer_err = (hidden - ref_hidden).norm(dim=-1)[:, scored] / ref_hidden.norm(dim=-1)[:, scored]
    row = {
        "document": window.document,
        "window": window.start,
        "tokens": len(nll),
        "nll_reference": float(nll_ref.mean()),
        "nll": float(nll.mean()),
        "next_token_kl": float(kl.mean()),
        "next_token_top1": float(top1.mean()),
        "final_hidden_cosine": float(layer_cos[-1].mean()),
        "cache_bytes_per_token": cache.nbytes()["stored"] / len(ids),
        "reference_bytes_per_token": reference.nbytes()["stored"]
        / len(ids),  # uncompressed, the model's dtype
    }
    per_layer = {
        "hidden_cosine": layer_cos.nanmean(-1).tolist(),
        "hidden_rel_error": layer_err.nanmean(-1).tolist(),  # as the cosine: a zero hidden state is undefined
    }
    return {"row": row, "per_layer": per_layer, "constant_bytes": cache.nbytes()["constants"]}
