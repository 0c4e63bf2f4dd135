"""Perplexity and hidden-state metrics with the cache in the loop, on a tiny model and against brute force."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tqlab.evaluate.perplexity import compare_window, first_chunk, windows
from tqlab.kv import KVQuantSpec


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return LlamaForCausalLM(config).float().eval()


def test_strided_windows_score_every_token_after_the_first_exactly_once():
    docs = [("a", list(range(50))), ("b", list(range(7)))]
    ws = windows(docs, context=16, stride=8)
    for title, ids in docs:
        scored = [
            w.start + i + 1
            for w in ws
            if w.document == title
            for i in range(max(w.scored_from - 1, 0), len(w.ids) - 1)
        ]
        assert sorted(scored) == list(range(1, len(ids)))  # each target position once


def test_uncompressed_perplexity_matches_a_plain_forward_pass(model):
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(1))
    (w,) = windows([("d", ids.tolist())], context=24, stride=24)
    spec = KVQuantSpec.create("turboquant_mse", 8, "random_haar", compress=("key", "value"), head_dim=16)
    got = compare_window(model, w, spec, {"protocol": "all_quantized"}, prefill=24, chunk_size=24)["row"]
    with torch.no_grad():
        logp = model(ids[None]).logits[0].double().log_softmax(-1)
    want = -sum(float(logp[t, ids[t + 1]]) for t in range(23)) / 23  # brute force, token by token
    assert got["nll_reference"] == pytest.approx(want, abs=1e-9)
    assert got["nll"] == pytest.approx(want, abs=2e-3)  # 8-bit codes: nearly lossless
    assert got["final_hidden_cosine"] > 0.999 and got["next_token_kl"] < 1e-3


def test_the_all_quantized_protocol_does_not_depend_on_chunking_and_prefill_exact_does(model):
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(2))
    (w,) = windows([("d", ids.tolist())], context=20, stride=20)
    spec = KVQuantSpec.create("turboquant_mse", 2, "random_haar", compress=("key", "value"), head_dim=16)
    one_pass = compare_window(model, w, spec, {"protocol": "all_quantized"}, prefill=20, chunk_size=20)
    stepwise = compare_window(model, w, spec, {"protocol": "all_quantized"}, prefill=1, chunk_size=1)
    for key in ("nll", "next_token_kl", "final_hidden_cosine"):
        assert one_pass["row"][key] == pytest.approx(stepwise["row"][key], abs=1e-6)
    assert one_pass["row"]["nll"] != pytest.approx(one_pass["row"]["nll_reference"], abs=1e-3)  # 2 bits cost
    decoded = compare_window(model, w, spec, {"protocol": "prefill_exact"}, prefill=10, chunk_size=1)["row"]
    assert decoded["tokens"] == 10  # only tokens after the exact prompt are scored: 10..19
    assert not math.isclose(decoded["nll"], decoded["nll_reference"], abs_tol=1e-4)
    off = compare_window(model, w, None, {"protocol": "prefill_exact"}, prefill=10, chunk_size=1)["row"]
    assert off["nll"] == pytest.approx(off["nll_reference"], abs=1e-6)  # no compression: the same model


@pytest.mark.parametrize(
    "codec,options,compress,recent",
    [
        ("turboquant_mse", {}, ("key", "value"), 19),  # every prediction's tokens within its 19 newest
        ("kivi", {"group": 16}, ("key",), 0),  # predictions 0..14 read a group of 16 keys that never filled
    ],
)
def test_tokens_kept_exact_by_position_are_measured_as_generation_keeps_them(
    model, codec, options, compress, recent
):
    """One pass would code what only the whole chunk pushed out of the exact tail; decoded token by token (the
    default here) each prediction above sees only exact keys, so the model's own distribution: KL 0."""
    n = 20 if recent else 16
    ids = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(5))
    (w,) = windows([("d", ids.tolist())], context=n, stride=n)
    rotation = "identity" if codec == "kivi" else "random_haar"
    spec = KVQuantSpec.create(codec, 2, rotation, compress=compress, codec_options=options, head_dim=16)
    layout = {"protocol": "all_quantized", "recent_window": recent}
    prefill = first_chunk("all_quantized", n, n, recent, spec)
    assert prefill == 1
    assert compare_window(model, w, spec, layout, prefill, 1)["row"]["next_token_kl"] == pytest.approx(
        0, abs=1e-9
    )
    assert compare_window(model, w, spec, layout, n, n)["row"]["next_token_kl"] > 1e-8  # one pass differs
    plain = KVQuantSpec.create("turboquant_mse", 2, "random_haar", compress=("key", "value"), head_dim=16)
    assert first_chunk("all_quantized", n, n, 0, plain) == n  # where chunking changes nothing: one pass
    assert first_chunk("prefill_exact", 24, 8, recent, spec) == 16


def test_windows_per_document_spread_the_windows_over_documents():
    docs = [(name, list(range(100))) for name in "abc"]
    ws = windows(docs, context=16, stride=8, limit=3, per_document=1)
    assert [(w.document, w.start) for w in ws] == [("a", 0), ("b", 0), ("c", 0)]


def test_windows_too_short_to_score_are_left_out():
    """Under prefill_exact a window no longer than its prompt scores nothing (a NaN that would poison the
    summary): with min_tokens = prefill + 2 short documents give no window and max_windows counts the rest;
    a window of exactly min_tokens is kept."""
    docs = [("short", list(range(30))), ("long", list(range(100))), ("long2", list(range(100)))]
    ws = windows(docs, context=64, stride=8, limit=2, per_document=1, min_tokens=58)
    assert [(w.document, len(w.ids)) for w in ws] == [("long", 64), ("long2", 64)]
    assert [w.document for w in windows(docs, context=64, stride=8, min_tokens=30, per_document=1)] == [
        "short",
        "long",
        "long2",
    ]
    assert windows(docs[:1], context=64, stride=8, min_tokens=31) == []
    assert [w.document for w in windows(docs, context=64, stride=8, limit=2, per_document=1)] == [
        "short",
        "long",
    ]
