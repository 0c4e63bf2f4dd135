"""Needle in a haystack: a fact hidden at a given depth of held-out text, asked for at the end.

The haystack is held-out text cut to `context` tokens; the needle sentence goes in at `depth` (0: the start,
1: just before the question); the model answers greedily and scores 1 when the answer contains the needle's
value as a whole number (exact match of the digits, not a part of a longer number). Run with and without the compressed cache on the same prompts.
"""

from __future__ import annotations

import re

import torch

from ..cache import compress_kv

NEEDLE = "The secret number of the day is {value}."
QUESTION = "\nQuestion: what is the secret number of the day?\nAnswer: The secret number of the day is"


def needle_prompt(tokenizer, haystack: list[int], context: int, depth: float, value: str) -> torch.Tensor:
    """Token ids of haystack[:n] with the needle inserted at `depth` and the question at the end, `context`
    tokens in all. A haystack that starts with the tokenizer's BOS keeps it first (depth 0 is just after it):
    models that sink attention on BOS would otherwise read the needle where their sink was."""
    needle = tokenizer(" " + NEEDLE.format(value=value) + " ", add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    room = context - len(needle) - len(question)
    if room < 1 or len(haystack) < room:
        raise ValueError(f"context={context} leaves no room for the haystack ({len(haystack)} tokens given)")
    bos = getattr(tokenizer, "bos_token_id", None)
    kept = 1 if bos is not None and haystack[:1] == [bos] else 0
    at = kept + round(depth * (room - kept))
    return torch.tensor(haystack[:at] + needle + haystack[at:room] + question)


@torch.no_grad()
def find_needle(model, tokenizer, prompt: torch.Tensor, value: str, cache, max_new_tokens: int = 8) -> dict:
    ids = prompt[None].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(  # an explicit mask: from pad_token_id alone a prompt token equal to it is masked
        ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad,
    )  # fmt: skip
    cache.check_norms()  # a decode step's overflowing norm would have made its answer come from NaN
    answer = tokenizer.decode(out[0, prompt.shape[0] :], skip_special_tokens=True)
    return {"answer": answer, "found": float(re.search(rf"(?<!\d){value}(?!\d)", answer) is not None)}


def needle_pair(
    model,
    tokenizer,
    prompt: torch.Tensor,
    value: str,
    spec,
    layout: dict,
    calibration=None,
    max_new_tokens: int = 8,
) -> dict:
    """The needle asked with the uncompressed cache and with the compressed one (`CacheLayout` fields)."""
    uncompressed = compress_kv(model, None)
    reference = find_needle(model, tokenizer, prompt, value, uncompressed, max_new_tokens)
    cache = compress_kv(model, spec, calibration, **layout)
    compressed = find_needle(model, tokenizer, prompt, value, cache, max_new_tokens)
    return {
        "found_reference": reference["found"],
        "found": compressed["found"],
        "cache_bytes_per_token": cache.nbytes()["stored"] / cache.get_seq_length(),
        "reference_bytes_per_token": uncompressed.nbytes()["stored"] / uncompressed.get_seq_length(),
        "answer": compressed["answer"],
        "answer_reference": reference["answer"],
    }
