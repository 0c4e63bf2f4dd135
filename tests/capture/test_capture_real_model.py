"""Capture from the real SmolLM2: the stored q, k, v reproduce the model's own attention."""

import json

import pytest
import torch

from tqlab.capture.hooks import AttentionRecorder
from tqlab.capture.store import CaptureStore


def reference_attention(q, k, v, scaling):
    """softmax(q kᵀ·scale + causal mask) v in float64, KV heads expanded to the query heads (GQA)."""
    groups = q.shape[-3] // k.shape[-3]
    k, v = (t.double().repeat_interleave(groups, dim=-3) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scaling
    t = q.shape[-2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_recorder_leaves_the_model_output_unchanged(smollm2):
    ids = smollm2.tokenizer("Anarchism is a political philosophy.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = smollm2.model(ids, use_cache=False).logits
        with AttentionRecorder(smollm2.model) as rec:
            recorded = smollm2.model(ids, use_cache=False).logits
    assert torch.equal(plain, recorded)
    assert sorted(rec.layers) == list(range(30))
    assert smollm2.model.config._attn_implementation == "sdpa"


def test_stored_qkv_recompute_every_layers_attention_output(small_capture, smollm2):
    store = CaptureStore(small_capture)
    from safetensors import safe_open

    with safe_open(str(small_capture / "test" / "shard_00000.safetensors"), framework="pt") as f:
        ids = f.get_tensor("input_ids")
    with torch.no_grad(), AttentionRecorder(smollm2.model, record_output=True) as rec:
        smollm2.model(ids, use_cache=False)
    for layer in store.layers:
        stored = store.load("test", layer, 0)
        expected = rec.layers[layer].output[0].transpose(0, 1).double()  # [H, T, D]
        got = reference_attention(stored["q"], stored["k"], stored["v"], store.layer_facts(layer)["scaling"])
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_gqa_mapping_and_architecture_are_recorded(small_capture):
    store = CaptureStore(small_capture)
    m = store.manifest
    assert m["kv_head_of_query_head"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = {"model_type": "llama", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}
    assert {k: store.architecture[k] for k in expected} == expected
    assert m["layers"]["without_kv_cache"] == []
    assert m["model"]["weights_sha256"] and m["versions"]["torch"]
    block = store.load("train", 3, 1, kv_head=2)
    full = store.load("train", 3, 1)
    torch.testing.assert_close(block["q"], full["q"][6:9])
    torch.testing.assert_close(block["k"], full["k"][2])
    assert block["q"].shape == (3, 64, 64) and block["k"].shape == (64, 64)


def test_splits_are_disjoint_by_article(small_capture):
    splits = json.loads((small_capture / "manifest.json").read_text())["splits"]
    titles = [set(info["documents"]) for info in splits.values()]
    assert all(titles) and not (titles[0] & titles[1] or titles[0] & titles[2] or titles[1] & titles[2])


def test_missing_layer_and_split_are_clear(small_capture):
    store = CaptureStore(small_capture)
    with pytest.raises(KeyError, match="split 'dev'"):
        store.load("dev", 0, 0)
    with pytest.raises(IndexError, match="has 2 sequences"):
        store.load("test", 0, 5)
