"""Relevance-gated key bits: the gate against a brute-force loop, causality (later keys never change earlier
decisions), bytes counted by hand, the random control, and what the configuration refuses."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tqlab import tasks
from tqlab.config import ConfigError
from tqlab.quant import RelevanceGated

ROOT = Path(__file__).parents[2]


def calibrated(**options):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(600, 64, generator=g) + 1.5  # a clear mean direction
    keys = torch.randn(2000, 64, generator=g)
    codec = RelevanceGated(64, 2, 4, rotation="fast_hadamard", **options)
    codec.calibrate(keys, queries)
    return codec, keys, queries


def test_the_gate_is_trim_and_square_of_the_cosine_with_the_mean_query_damped_by_position():
    codec, keys, queries = calibrated(share=0.25, trim=0.1, half_life=16)
    mean = queries.mean(0)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    want = []
    for t in range(40):
        cos = float(x[t] @ mean) / float(x[t].norm() * mean.norm())
        want.append(max(cos - 0.1, 0.0) ** 2 * 16 / (16 + t))
    torch.testing.assert_close(
        codec.relevance(x).double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    assert torch.equal(codec.flags(x), codec.relevance(x) > codec.threshold)
    # the threshold is the (1 − share) quantile of the undamped relevance of the calibration keys (trimmed
    # keys tie at 0, so with trim = 0.1 fewer than `share` pass: ≈ P(cos > 0.1) = 21 % at d = 64)
    plain, keys, _ = calibrated(share=0.25)
    undamped = torch.tensor([max(float(k @ mean) / float(k.norm() * mean.norm()), 0) ** 2 for k in keys])
    assert (undamped > plain.threshold).float().mean() == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("gate", ["relevance", "random"])
def test_later_keys_never_change_earlier_decisions_or_codes(gate):
    codec, _, _ = calibrated(gate=gate, half_life=32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 50, 64, generator=g)
    other = x.clone()
    other[:, 30:] = torch.randn(2, 20, 64, generator=g) * 5  # a different future
    for future in (x, other, x[:, :30]):
        assert torch.equal(codec.flags(future)[:, :30], codec.flags(x)[:, :30])
        torch.testing.assert_close(
            codec.dequantize(codec.quantize(future))[:, :30], codec.dequantize(codec.quantize(x))[:, :30]
        )


def test_bytes_are_the_flags_and_each_tiers_codes_counted_by_hand():
    codec, _, _ = calibrated()
    x = torch.randn(3, 21, 64, generator=torch.Generator().manual_seed(3))
    high = int(codec.flags(x).sum())
    code = codec.quantize(x)
    assert 0 < high < 63
    assert code.nbytes == 3 * 3 + high * (64 * 4 // 8 + 2) + (63 - high) * (64 * 2 // 8 + 2)
    decoded = codec.dequantize(code)
    err = ((decoded - x) ** 2).sum(-1) / (x**2).sum(-1)
    flags = codec.flags(x)
    assert err[flags].mean() < err[~flags].mean() / 2  # the high tier is coded finer


def test_random_gate_draws_the_share_per_position():
    codec, _, _ = calibrated(gate="random", share=0.25)
    flags = codec.flags(torch.zeros(1, 4000, 64))
    assert flags.float().mean() == pytest.approx(0.25, abs=0.03)


def compose_eval(tmp_path, *overrides):
    synthetic = ["data=synthetic", "data.seq_len=32", "data.sequences={train:4,validation:2,test:2}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="eval", overrides=[*synthetic, "logger=none", "progress=false", *overrides])
    c.results_root, c.output_dir = str(tmp_path / "runs"), str(tmp_path / "out")
    return c


def test_gated_keys_evaluate_on_blocks_and_are_refused_where_they_cannot_run(tmp_path):
    c = compose_eval(tmp_path, "codec=relevance_gated", "bits=2", "rotation=fast_hadamard", "kv=key_only")
    summary = json.loads((tasks.evaluate(c).folder / "summary.json").read_text())
    bits = summary["overall"]["key_bits_per_coordinate"]
    assert 2 + 16 / 64 < bits < 4 + 16 / 64 + 1  # between the tiers (flags: one bit per 64 coordinates)
    gated = ["codec=relevance_gated", "bits=2", "rotation=fast_hadamard"]
    with pytest.raises(ConfigError, match="codes only \\['key'\\]"):
        tasks.evaluate(compose_eval(tmp_path, *gated, "kv=full_kv"))
    with pytest.raises(ConfigError, match=r"codec takes no option\(s\) \[.center.\]"):
        tasks.evaluate(compose_eval(tmp_path, *gated, "kv=key_only", "+codec.center=true"))


def tiny_model(sliding: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    # one layer: its keys come from the embeddings alone, so feeding tokens whole or one by one stores the same
    # keys (a second layer's keys would depend on what the first layer's early tokens saw)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, head_dim=16)
    if sliding:
        config = Qwen2Config(
            **common, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
            layer_types=["sliding_attention"],
        )  # fmt: skip
        return Qwen2ForCausalLM(config).float().eval()
    return (
        LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)).float().eval()
    )


def gated_cache(model, **gate):
    from tqlab.cache import compress_kv
    from tqlab.kv import KVQuantSpec

    spec = KVQuantSpec.create(
        "relevance_gated", 2, "random_haar", compress=("key",), codec_options=gate, head_dim=16
    )
    g = torch.Generator().manual_seed(5)
    stats = {"key": torch.randn(300, 16, generator=g), "value": torch.randn(300, 16, generator=g)}
    stats["query"] = torch.randn(300, 16, generator=g) + 1.0
    return compress_kv(model, spec, lambda side, layer, head: stats[side])


def logits(model, ids, cache):
    with torch.no_grad():
        return model(ids, cache=cache).logits.double()


@pytest.mark.parametrize(
    "sliding,gate", [(False, {}), (True, {}), (False, {"half_life": 4}), (True, {"gate": "random"})]
)
def test_gated_keys_in_the_cache_append_a_group_at_a_time(sliding, gate):
    """Fed whole or token by token, the cache ends holding the same codes (two whole groups of 8 keys coded,
    5 waiting exact), so the next step's logits agree; the sliding layer has dropped whole groups."""
    model = tiny_model(sliding)
    ids = torch.randint(0, 97, (1, 22), generator=torch.Generator().manual_seed(6))
    whole = gated_cache(model, **gate)
    logits(model, ids[:, :21], whole)
    steps = gated_cache(model, **gate)
    for i in range(21):
        logits(model, ids[:, i : i + 1], steps)
    torch.testing.assert_close(
        logits(model, ids[:, 21:], steps), logits(model, ids[:, 21:], whole), atol=1e-5, rtol=0
    )
    assert steps.nbytes() == whole.nbytes()
    if not sliding:
        parts = whole.layers[0].segments("key", 0)
        assert [p[1].shape[-1] if p[1] is not None else p[2].shape[-2] for p in parts] == [16, 6]
        # coded token by token (groups at positions 0 and 8) or whole (one chunk from 0), the gate saw each key at
        # the same absolute position: the same flags (with damping, chunk-relative positions would differ)
        stored = [c.layers[0].segments("key", h)[0][1].flags for c in (steps, whole) for h in range(2)]
        assert torch.equal(stored[0], stored[2]) and torch.equal(stored[1], stored[3])
    if sliding:
        layer = steps.layers[0]
        assert layer.offset > 0 and layer.offset % 8 == 0


def test_a_batch_of_gated_keys_equals_each_sequence_alone():
    model = tiny_model()
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 97, (1, 19), generator=g), torch.randint(0, 97, (1, 19), generator=g)
    together = logits(model, torch.cat([a, b]), gated_cache(model))
    alone = torch.cat([logits(model, x, gated_cache(model)) for x in (a, b)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_a_block_with_no_key_in_one_tier_codes_and_decodes():
    codec, _, queries = calibrated()
    mean = queries.mean(0)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(8))
    x -= (x @ mean)[:, None] * mean / mean.dot(mean)  # orthogonal to q̄: relevance 0, every key low
    code = codec.quantize(x)
    assert code.high.shape == (0,) and code.low.shape == (9,)
    decoded = codec.dequantize(code)
    assert decoded.shape == x.shape and ((decoded - x).norm(dim=-1) < x.norm(dim=-1)).all()


def test_a_key_along_the_mean_query_has_cosine_at_most_one_and_non_finite_queries_are_refused():
    codec, _, queries = calibrated(share=0.25, trim=0.0, half_life=0)
    along = codec.query_direction.repeat(64, 1) * torch.logspace(-3, 3, 64)[:, None]
    assert (codec.relevance(along) <= 1).all()  # (cos − 0)² with cos clamped: fp32 round-off passed 1
    queries[3, 5] = float("nan")
    with pytest.raises(ValueError, match="RelevanceGated.calibrate: input contains NaN or Inf"):
        codec.calibrate(torch.randn(100, 64), queries)
