"""TurboQuantCache inside real transformers models (tiny random ones of several architectures):
exactly SDPA when off, attention from codes equal to attention over decoded keys and values, the protocols,
chunking, batching with padding, and bytes from what is stored."""

import pytest
import torch
from transformers import (
    AttentionInterface,
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tqlab.cache import compress_kv
from tqlab.kv import KVQuantSpec, RuleError
from tqlab.quant import packed_row_bytes

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, head_dim=16)


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "llama":  # GQA: 4 query heads on 2 KV heads
        model = LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2))
    elif arch == "llama_mqa":  # one KV head
        model = LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1))
    elif arch == "qwen2_sliding":  # layer 1 slides over 6 tokens
        config = Qwen2Config(
            **COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=6,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
        )
        model = Qwen2ForCausalLM(config)
    else:  # gemma3: query pre-attention scalar, q/k norms, sliding layers
        config = Gemma3TextConfig(
            **COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=6,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        model = Gemma3ForCausalLM(config)
    return model.float().eval()


ARCHS = ["llama", "llama_mqa", "qwen2_sliding", "gemma3"]
SPEC = dict(compress=("key", "value"), head_dim=16)


def logits(model, ids, cache, **kw):
    with torch.no_grad():
        return model(ids, cache=cache, **kw).logits.double()


@pytest.mark.parametrize("arch", ARCHS)
def test_with_compression_off_the_cache_is_exactly_sdpa_with_a_dynamic_cache(arch):
    model = tiny(arch)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("sdpa")
    want = logits(model, ids, DynamicCache(config=model.config))
    want_tokens = model.generate(
        ids, cache=DynamicCache(config=model.config), max_new_tokens=6, do_sample=False
    )
    got = logits(model, ids, compress_kv(model, None))
    assert torch.equal(got, want)
    tokens = model.generate(ids, cache=compress_kv(model, None), max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, want_tokens)


def test_a_cache_under_another_attention_is_refused_instead_of_ignored():
    """Any attention but tqlab's reads only the new tokens `update` returns, never the codes: a call under
    another attention implementation is refused before anything is stored, and a cache that still misses a
    read (another model instance ran it) refuses its next call. `append` fills a cache with no model at all."""
    from tqlab.cache import TurboQuantCache

    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    spec = KVQuantSpec.create("turboquant_mse", 3, "random_haar", **SPEC)
    cache = compress_kv(model, spec)
    logits(model, ids[:, :5], cache)
    model.set_attn_implementation("sdpa")  # e.g. a later call switched it back
    fresh = TurboQuantCache.from_spec(model.config, spec)  # from_spec leaves the model's attention as it is
    for stale in (cache, fresh):
        with pytest.raises(
            RuntimeError, match='the model runs attn_implementation="sdpa", which would attend'
        ):
            logits(model, ids[:, 5:], stale)
    assert fresh.get_seq_length() == 0 and cache.get_seq_length() == 5  # nothing stored
    other = tiny("llama")  # a second instance, under SDPA, with a cache made for the first one
    compress_kv(model, None)  # the first model back on tqlab's attention
    shared = compress_kv(model, spec)
    logits(other, ids[:, :5], shared)
    with pytest.raises(RuntimeError, match="layer 0: the tokens of the previous call were never read"):
        logits(model, ids[:, 5:], shared)
    filled = TurboQuantCache.from_spec(model.config, spec)
    for _ in range(2):
        filled.append(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), 0)
    assert filled.get_seq_length(0) == 8


def _decoded_reference(model, bank, sink_tokens: int = 0, exact_recent: int = 0):
    """float64 eager attention over keys and values decoded from the same codecs (tokens sink_tokens..t −
    exact_recent − 1 encoded in one call, the others exact), with an independent brute-force mask."""

    def reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        b, hq, tq, d = query.shape
        kvh, t = key.shape[1], key.shape[2]
        coded = slice(min(sink_tokens, t), max(t - exact_recent, min(sink_tokens, t)))

        def decoded(side, states):
            states = states.clone()
            for h in range(kvh):
                c = bank.get(side, module.layer_idx, h, "cpu")
                if coded.stop > coded.start:
                    states[:, h, coded] = c.dequantize(c.quantize(states[:, h, coded])).to(states.dtype)
            return states

        k_hat, v_hat = decoded("key", key), decoded("value", value)
        group = hq // kvh
        k_hat, v_hat = k_hat.double().repeat_interleave(group, 1), v_hat.double().repeat_interleave(group, 1)
        s = query.double() @ k_hat.transpose(-1, -2) * scaling
        window = getattr(module, "sliding_window", None)
        allowed = torch.zeros(tq, t, dtype=torch.bool)
        for i in range(tq):
            pos = t - tq + i
            for j in range(t):
                allowed[i, j] = j <= pos and (not window or pos - j < window)
        s = s.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(s, -1) @ v_hat
        return out.transpose(1, 2).to(query.dtype), None

    return reference


@pytest.mark.parametrize(
    "arch,codec,bits",
    [(arch, "turboquant_mse", 3) for arch in ARCHS]
    + [("llama", "turboquant_prod", 3), ("llama", "turboquant_mse", 2.5), ("gemma3", "int4_block", 4)],
)
def test_attention_from_codes_equals_attention_over_decoded_keys_and_values(arch, codec, bits):
    model = tiny(arch)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    rotation = "fast_hadamard" if codec == "int4_block" else "random_haar"
    calibration = (lambda side, layer, head: torch.randn(64, 16)) if bits == 2.5 else None
    options = {"block": 16} if codec == "int4_block" else {}
    spec = KVQuantSpec.create(codec, bits, rotation, codec_options=options, **SPEC)
    cache = compress_kv(model, spec, calibration=calibration)
    got = logits(model, ids, cache)
    AttentionInterface.register("decoded_reference", _decoded_reference(model, cache.bank))
    model.set_attn_implementation("decoded_reference")
    want = logits(model, ids, DynamicCache(config=model.config))  # the full history, decoded at every layer
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_chunked_prefill_equals_token_by_token_decoding_when_compressed():
    model = tiny("qwen2_sliding")
    ids = torch.randint(0, 97, (1, 15), generator=torch.Generator().manual_seed(3))
    spec = KVQuantSpec.create("turboquant_mse", 2, "random_haar", **SPEC)
    whole = logits(model, ids, compress_kv(model, spec))
    cache = compress_kv(model, spec)
    steps = torch.cat([logits(model, ids[:, i : i + 1], cache) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, whole, atol=1e-5, rtol=0)
    sliding, full = cache.layers[1], cache.layers[0]  # decoded token by token: the sliding layer dropped
    assert sliding.held <= 2 * 6 and sliding.offset > 0 and full.held == full.get_seq_length() == 15
    assert sliding.nbytes() < full.nbytes()
    cache = compress_kv(model, spec)
    chunks = torch.cat([logits(model, ids[:, i : i + 4], cache) for i in range(0, 15, 4)], dim=1)
    torch.testing.assert_close(chunks, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("codec,bits,options", [("turboquant_mse", 2.5, {}), ("kivi", 2, {"group": 4})])
def test_dropping_the_oldest_tokens_leaves_the_codes_of_the_rest(codec, bits, options):
    from tqlab.cache.codes import drop_front
    from tqlab.kv.builder import CodecBank

    spec = KVQuantSpec.create(
        codec, bits, "identity" if codec == "kivi" else "random_haar", codec_options=options, **SPEC
    )
    bank = CodecBank(spec, 16, lambda side, layer, head: torch.randn(64, 16))
    keys = bank.get("key", 0, 0, "cpu")
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(12))
    kept = drop_front(keys.quantize(x), 8)
    assert kept.shape == (2, 4) and kept.nbytes == keys.quantize(x[:, 8:]).nbytes
    torch.testing.assert_close(keys.dequantize(kept), keys.dequantize(keys.quantize(x[:, 8:])))


def test_prefill_exact_prompts_see_themselves_exactly_and_later_tokens_see_codes():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    spec = KVQuantSpec.create("turboquant_mse", 2, "random_haar", **SPEC)
    exact = logits(model, ids, compress_kv(model, None))
    cache = compress_kv(model, spec, protocol="prefill_exact")
    prompt = logits(model, ids[:, :8], cache)
    torch.testing.assert_close(prompt, exact[:, :8], atol=1e-5, rtol=0)  # the prompt: no compression seen
    later = logits(model, ids[:, 8:], cache)
    quantized = logits(model, ids, compress_kv(model, spec))  # all-quantized: everyone sees codes
    assert (later - exact[:, 8:]).abs().max() > 1e-3  # later tokens see the prompt through its codes
    assert not torch.allclose(later, quantized[:, 8:], atol=1e-5)  # ... but their own chunk exactly


def test_batched_generation_with_left_padding_equals_each_sequence_alone():
    model = tiny("llama")
    spec = KVQuantSpec.create("turboquant_mse", 3, "fast_hadamard", **SPEC)
    short = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(5))
    long = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 7)], 1), torch.ones(1, 11)]).long()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, cache=compress_kv(model, spec), **kw)
    alone = [model.generate(x, cache=compress_kv(model, spec), **kw) for x in (short, long)]
    assert torch.equal(together[0, 4:], alone[0][0]) and torch.equal(together[1], alone[1][0])


def test_cache_bytes_are_the_stored_codes_counted_by_hand():
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(7))
    cache = compress_kv(
        model, KVQuantSpec.create("turboquant_mse", 3, "random_haar", compress=("key",), head_dim=16)
    )
    logits(model, ids, cache)
    vectors = 3 * 2 * 2 * 10  # layers × KV heads × batch × tokens
    keys = vectors * (packed_row_bytes(16, 3) + 2)  # packed 3-bit indices + an fp16 norm
    values = vectors * 16 * 4  # values kept exact, in the model's float32
    assert cache.get_seq_length() == 10
    assert cache.nbytes()["stored"] == keys + values
    assert cache.nbytes()["constants"] > 0


@pytest.mark.parametrize(
    "codec,sinks,recent,exact_recent",
    [
        ("turboquant_mse", 3, 0, 0),
        ("centered", 2, 3, 3),  # mean removal: q·μ added to coded scores, as exact tokens carry it
        ("query_metric", 1, 2, 2),  # keys coded in the queries' metric, around their mean
        ("turboquant_mse", 0, 5, 5),
        ("turboquant_prod", 2, 4, 4),
        ("kivi", 0, 0, 3),  # 19 tokens: one group of 16 keys encoded, 3 kept exact as KIVI does
        ("kivi", 1, 2, 2),  # 1 sink, 16 encoded, 2 recent
        ("transform_coding", 1, 2, 2),  # values summed in its eigenbasis, keys in the query metric
    ],
)
def test_sinks_and_the_recent_window_stay_exact_and_the_rest_reads_codes(codec, sinks, recent, exact_recent):
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(9))
    options = {
        "kivi": {"group": 16},
        "centered": {"center": True},
        "query_metric": {"center": True, "key_metric": "query"},
        "transform_coding": {"center": True, "key_metric": "query"},
    }.get(codec, {})
    rotation = "identity" if codec in ("kivi", "transform_coding") else "random_haar"
    bits = 2 if codec == "kivi" else 3
    codec = "turboquant_mse" if codec in ("centered", "query_metric") else codec
    spec = KVQuantSpec.create(codec, bits, rotation, codec_options=options, **SPEC)
    offset = torch.randn(16, generator=torch.Generator().manual_seed(11))  # a mean the keys lack: still exact

    def calibration(side, layer, head):
        return offset + torch.randn(64, 16, generator=torch.Generator().manual_seed(layer * 7 + head))

    cache = compress_kv(model, spec, calibration, sink_tokens=sinks, recent_window=recent)
    got = logits(model, ids, cache)
    reference = _decoded_reference(model, cache.bank, sinks, exact_recent)
    AttentionInterface.register("decoded_reference", reference)
    model.set_attn_implementation("decoded_reference")
    want = logits(model, ids, DynamicCache(config=model.config))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_decoding_token_by_token_encodes_each_token_once_and_counts_every_byte():
    model = tiny("llama")  # 3 layers × 2 KV heads, head_dim 16, float32
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(10))
    spec = KVQuantSpec.create("kivi", 2, "identity", codec_options={"group": 16}, **SPEC)
    cache = compress_kv(model, spec, sink_tokens=2, recent_window=4)
    for i in range(40):
        logits(model, ids[:, i : i + 1], cache)
    layer = cache.layers[0]
    # 2 sinks; keys leave the window in whole groups of 16: 32 encoded, 6 exact (4 recent + 2 waiting)
    assert [
        part[2].shape[-2] if part[1] is None else part[1].shape[1] for part in layer.segments("key", 0)
    ] == [
        2,
        32,
        6,
    ]
    exact = 2 * 2 * (2 + 6) * 16 * 4  # K and V, 2 heads, 8 exact tokens, float32
    keys = (
        2 * 16 * (2 * 32 // 8 + 2 * 2 + 2 * 2)
    )  # per head and channel: 32 2-bit codes + fp16 scale, zero per group
    values = 2 * 32 * (16 * 2 // 8 + 2 + 2)  # per head and token: 16 2-bit codes + fp16 scale and zero
    assert layer.nbytes() == exact + keys + values
    assert cache.nbytes()["stored"] == 3 * (exact + keys + values)
    whole = compress_kv(model, spec, sink_tokens=2, recent_window=4)  # one call: same layout at the end
    logits(model, ids, whole)
    assert whole.nbytes()["stored"] == cache.nbytes()["stored"]


def test_exact_layers_stay_uncompressed_beside_compressed_sliding_layers():
    model = tiny("gemma3")  # layers 0 and 2 slide over 6 tokens; 16 tokens run past the window
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(8))
    spec = KVQuantSpec.create("turboquant_mse", 2, "random_haar", **SPEC)
    exact = logits(model, ids, compress_kv(model, None))
    every = logits(model, ids, compress_kv(model, spec, exact_layers=(0, 1, -1)))
    torch.testing.assert_close(every, exact, atol=1e-5, rtol=0)  # all exact: only float rounding differs
    some = compress_kv(model, spec, exact_layers=(0,))  # an exact sliding layer beside a compressed one
    mixed = logits(model, ids, some)
    compressed = logits(model, ids, compress_kv(model, spec))
    assert (mixed - exact).abs().max() < (compressed - exact).abs().max()
    per_layer = [layer.nbytes() for layer in some.layers]
    assert per_layer[0] == 2 * 2 * 16 * 16 * 4  # K and V, 2 KV heads, 16 tokens, head_dim 16, float32
    with pytest.raises(ValueError, match=r"exact_layers=\[3\]: \[3\] are not layers of this 3-layer model"):
        compress_kv(model, spec, exact_layers=(3,))


def test_what_the_codes_cannot_do_is_refused_by_name():
    """Beam search reorders, assisted decoding crops, contrastive search selects and repeats batch rows, and
    offloading moves keys: none of it is modelled over codes, so each says so instead of failing deep inside."""
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    spec = KVQuantSpec.create("turboquant_mse", 3, "random_haar", **SPEC)
    with pytest.raises(ValueError, match="beam search is not supported over compressed codes"):
        model.generate(ids, cache=compress_kv(model, spec), max_new_tokens=3, num_beams=2, do_sample=False)
    cache = compress_kv(model, spec)
    logits(model, ids, cache)
    for call, match in [
        (lambda: cache.crop(2), "crop"),
        (lambda: cache.batch_repeat_interleave(2), "batch_repeat_interleave"),
        (lambda: cache.batch_select_indices(torch.tensor([0])), "batch_select_indices"),
        (lambda: cache.layers[0].offload(), "offloading"),
    ]:
        with pytest.raises(ValueError, match=f"{match} .*is not supported over compressed codes"):
            call()


def test_fitted_rotations_must_cover_every_compressed_layer_before_any_step(tmp_path):
    """A rotation file fitted on layers 0 and 1 of a 3-layer model: refused when the cache is made (not in
    the middle of a run with an unclear error), and taken when layer 2 stays exact."""
    from tqlab import rotation
    from tqlab.kv import RuleError
    from tqlab.rotation.io import save_rotations

    fitted = {f"key_layer{i}": rotation.make_rotation("block_so8_learned", 16, seed=i) for i in range(2)}
    facts = {
        "rotation": "block_so8_learned", "rotation_options": {"view": "vector", "init": "random"}, "dim": 16,
        "codec": "turboquant_mse", "bits": {"key": 2, "value": None}, "model": "m", "layers": [0, 1],
    }  # fmt: skip
    save_rotations(tmp_path / "best.safetensors", fitted, facts)
    spec = KVQuantSpec.create(bits=2, compress=("key",), fitted=tmp_path / "best.safetensors", model="m")
    model = tiny("llama")
    with pytest.raises(RuleError, match=r"has no key rotation for \(layer, head\) \[\(2, 0\), \(2, 1\)\]"):
        compress_kv(model, spec)
    logits(model, torch.randint(0, 97, (1, 6)), compress_kv(model, spec, exact_layers=(2,)))


def test_appends_of_another_shape_and_exact_layers_of_another_kind_are_refused_by_name():
    model = tiny("llama")  # 2 KV heads, head_dim 16
    spec = KVQuantSpec.create("turboquant_mse", 2, "random_haar", **SPEC)
    cache = compress_kv(model, spec)
    cache.append(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), 0)
    with pytest.raises(ValueError, match=r"layer 0: keys \[1, 3, 4, 16\] .* \[batch, 2 KV heads"):
        cache.append(torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16), 0)  # a third head would go unstored
    with pytest.raises(ValueError, match="layer 0: 2 sequences after 1"):
        cache.append(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), 0)
    with pytest.raises(ValueError, match="layer 0: keys .* and values"):
        cache.append(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16), 0)
    assert cache.get_seq_length(0) == 4  # nothing of the refused appends stored
    cache.reset()  # a reset cache takes a new batch, as a fresh one would
    cache.append(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), 0)
    assert cache.get_seq_length(0) == 4
    for bad in (0, None):
        with pytest.raises(RuleError, match=f"exact_layers={bad} must be a list of layer indices"):
            compress_kv(model, spec, exact_layers=bad)


def test_an_older_transformers_is_named_at_import():
    """transformers 5.17 (a GPU image's own) builds this cache wrong deep inside a forward call
    (`zip() argument 2 is shorter`); importing the package names the version and its file instead."""
    import subprocess
    import sys

    import transformers

    from tqlab.cache.requirements import MIN_TRANSFORMERS, require_transformers

    with pytest.raises(
        ImportError, match=rf"transformers>={MIN_TRANSFORMERS}; this Python imports 5\.17\.0 from"
    ):
        require_transformers("5.17.0")
    require_transformers(transformers.__version__)  # the installed one, which pyproject.toml allows
    require_transformers("5.24.0")
    # the check's floor is the one pyproject.toml declares (read from the file: the GPU machine runs the
    # tests from source, with no installed package metadata)
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    (pin,) = re.findall(r'"(transformers[^"]*)"', (Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert ">=" + MIN_TRANSFORMERS in {str(s) for s in Requirement(pin).specifier}
    # in a fresh interpreter whose transformers says 5.17.0: the package import, before tqlab.cache.cache
    older = "import transformers; transformers.__version__ = '5.17.0'; import tqlab.cache.cache"
    run = subprocess.run([sys.executable, "-c", older], capture_output=True, text=True)
    assert run.returncode != 0 and "this Python imports 5.17.0 from" in run.stderr, run.stderr
