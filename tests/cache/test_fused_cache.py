"""TurboQuantCache on the Triton kernels (here in Triton's interpreter) against its PyTorch reference path:
the same codes, the same attention up to the kernels' fp16 operands, under both protocols, with exact sinks
and a recent window merged by log-sum-exp, left padding, chunked prompts, and a sliding layer."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from tqlab.cache import attention, compress_kv, fused  # noqa: E402
from tqlab.cache.cache import TurboQuantLayer  # noqa: E402
from tqlab.kernels import decode, step  # noqa: E402
from tqlab.kernels.packed import sign_magnitude  # noqa: E402
from tqlab.kv import KVQuantSpec  # noqa: E402
from tqlab.registry import RuleError  # noqa: E402

# One layer: a second one would quantize keys that differ by the first one's roundoff, and a key at a
# boundary tie would then take another code on the two paths.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMMON = dict(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=1, head_dim=32)
TOLERANCE = 1e-3  # of the logits' scale: fp16 operands (2^-11 roundoff) in the kernel's scores and values


def tiny(sliding: bool = False, kv_heads: int = 2):
    torch.manual_seed(0)
    if sliding:  # the layer slides over 6 tokens
        config = Qwen2Config(
            **COMMON, num_attention_heads=4, num_key_value_heads=kv_heads, use_sliding_window=True,
            sliding_window=6, layer_types=["sliding_attention"],
        )  # fmt: skip
        return Qwen2ForCausalLM(config).float().eval().to(DEVICE)
    config = LlamaConfig(**COMMON, num_attention_heads=8, num_key_value_heads=kv_heads)
    return LlamaForCausalLM(config).float().eval().to(DEVICE)


def spec(bits=3, rotation="fast_hadamard", **kw):
    return KVQuantSpec.create("turboquant_mse", bits, rotation, compress=("key", "value"), head_dim=32, **kw)


@pytest.fixture(autouse=True)
def codec_codes(monkeypatch):
    """The kernel path quantizes with the codecs themselves, so that both paths hold the same bytes and
    these tests compare attention alone (the fused quantize, which may move a coordinate at a boundary tie
    by one code, is tested against the codec in tests/kernels)."""

    def encode(layer, side, chunk):
        codes = [codec.quantize(chunk[:, h]) for h, codec in enumerate(layer.codecs[side])]
        packed = layer.packed[side]
        fields = {name: torch.stack([getattr(c, name) for c in codes], 1) for name in packed.fields}
        if packed.sign_magnitude:  # 4-bit codes are stored as sign-magnitude labels
            fields["indices"] = sign_magnitude(fields["indices"])
        packed.append(*fields.values())

    monkeypatch.setattr(TurboQuantLayer, "_encode_packed", encode)


def kernels_only(monkeypatch):
    """Make the reference attention fail, so that a run shows the kernel path served every call."""

    def fail(*args):
        raise AssertionError("the reference path was taken")

    monkeypatch.setattr(attention, "attend", fail)


def spy_step_ends(monkeypatch) -> list:
    """Record each `kernels.step.finish_step` call: whether it joined an exact token, and its output's dtype."""
    calls, real = [], step.finish_step

    def finish_step(out, lse, rotations, query=None, *args, **kwargs):
        result = real(out, lse, rotations, query, *args, **kwargs)
        calls.append((query is not None, result.dtype))
        return result

    monkeypatch.setattr(step, "finish_step", finish_step)
    return calls


def run(model, chunks, kernels, spec_=None, attention_mask=None, **layout):
    """Logits of `chunks` of token ids fed one call after another into one cache."""
    cache = compress_kv(model, spec_ or spec(), kernels=kernels, **layout)
    out = []
    with torch.no_grad():
        for ids in chunks:
            out.append(model(ids, cache=cache, attention_mask=attention_mask).logits.double())
    return torch.cat(out, dim=1), cache


def ids(n, seed=1, batch=1):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def assert_same(got, want, exact=None):
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE * want.abs().max())
    if exact is not None:  # the codes are read, not bypassed: compression moves the logits far more
        assert (want - exact).abs().max() > 20 * TOLERANCE * want.abs().max()


@pytest.mark.parametrize(
    "layout",
    [
        dict(),  # all-quantized: the prompt in chunks of query tokens, then decode steps
        dict(protocol="prefill_exact"),
        dict(sink_tokens=2, recent_window=3),
        dict(protocol="prefill_exact", sink_tokens=1),
        dict(sink_tokens=1),  # a decode step's one exact token a sink: joined in `finish_step`
        dict(recent_window=1),  # likewise, the window's one token
    ],
)
@pytest.mark.parametrize("exact_logits", [None, 1])
def test_kernel_path_equals_the_reference_path(layout, exact_logits, monkeypatch):
    """exact_logits=1: the exact tokens' attention one KV head at a time (as for long chunks), not all at once."""
    if exact_logits is not None:
        if not layout:
            pytest.skip("no exact tokens to attend")
        monkeypatch.setattr(fused, "EXACT_LOGITS", exact_logits)
    model = tiny()
    chunks = [ids(21), ids(1, 2), ids(1, 3), ids(4, 4)]
    with monkeypatch.context() as patch:
        kernels_only(patch)
        ends = spy_step_ends(patch)
        got, cache = run(model, chunks, "triton", **layout)
    want, reference = run(model, chunks, "torch", **layout)
    # a one-token step ends in `finish_step` with no exact token or a single one (joined there), else in PyTorch
    exact = (
        layout.get("sink_tokens", 0)
        + layout.get("recent_window", 0)
        + (layout.get("protocol") == "prefill_exact")
    )
    assert [joined for joined, _ in ends] == ([exact == 1] * 2 * len(cache.layers) if exact <= 1 else [])
    assert all(layer.packed is not None for layer in cache.layers)
    assert all(layer.packed is None for layer in reference.layers)
    with torch.no_grad():
        exact = model(torch.cat(chunks, 1)).logits.double()
    assert_same(got, want, exact)
    got_bytes, want_bytes = cache.nbytes(), reference.nbytes()
    # the same bytes stored, in one tensor per side; the kernels' tensors hold rows ahead (grown by half)
    assert got_bytes["stored"] == want_bytes["stored"] and got_bytes["constants"] == want_bytes["constants"]
    assert want_bytes["allocated"] == want_bytes["stored"] <= got_bytes["allocated"]


@pytest.mark.parametrize("layout", [dict(), dict(protocol="prefill_exact")])
def test_a_bf16_models_one_token_steps_end_in_its_dtype(layout, monkeypatch):
    """The fused end stores the model's dtype (no cast after it), and the logits stay the reference path's."""
    model = tiny().bfloat16()
    chunks = [ids(21), ids(1, 2), ids(1, 3)]
    with monkeypatch.context() as patch:
        kernels_only(patch)
        ends = spy_step_ends(patch)
        got, cache = run(model, chunks, "triton", **layout)
    want, _ = run(model, chunks, "torch", **layout)
    assert ends == [("protocol" in layout, torch.bfloat16)] * 2 * len(cache.layers)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max())  # bf16's 2^-8 roundoff


@pytest.mark.parametrize("layout", [dict(), dict(protocol="prefill_exact", sink_tokens=1, recent_window=2)])
@pytest.mark.parametrize("k_bits, v_bits", [(3, 4), (5, 3)])
def test_prod_codes_on_the_kernel_path_equal_the_reference_path(layout, k_bits, v_bits, monkeypatch):
    """TurboQuant-Prod (Stage-1 codes of 2–4 bits + QJL signs): the kernels score keys with its estimator
    and accumulate values as its dequantized vectors, as the reference's codec.score and dequantize do."""
    model = tiny()
    prod = KVQuantSpec.create(
        "turboquant_prod", k_bits=k_bits, v_bits=v_bits, rotation="fast_hadamard", head_dim=32
    )
    chunks = [ids(21), ids(1, 2), ids(3, 4)]
    with monkeypatch.context() as patch:
        kernels_only(patch)
        got, cache = run(model, chunks, "triton", prod, **layout)
    want, reference = run(model, chunks, "torch", prod, **layout)
    assert all(layer.packed["key"].sketch for layer in cache.layers)
    with torch.no_grad():
        exact = model(torch.cat(chunks, 1)).logits.double()
    assert_same(got, want, exact)
    assert cache.nbytes()["stored"] == reference.nbytes()["stored"]


def biased():
    """The tiny model with large key and value biases (Qwen2.5's keys carry one): keys and values sit far from
    0, around means that centering removes."""
    model = tiny()
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            proj = getattr(model.model.layers[0].self_attn, name)
            proj.bias = torch.nn.Parameter(
                3 * torch.randn(proj.out_features, generator=torch.Generator().manual_seed(11))
            )
    return model.to(DEVICE)


def centered_cache(model, codec="turboquant_mse", bits=3, **layout):
    """A cache whose codecs code x − μ, μ each KV head's mean key and value over other text of the model's."""
    spec_ = KVQuantSpec.create(
        codec, bits, "fast_hadamard", compress=("key", "value"), head_dim=32, codec_options={"center": True}
    )
    seen = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids(64, seed=20), cache=seen)

    def calibration(side, layer, head):
        states = seen.layers[layer].keys if side == "key" else seen.layers[layer].values
        return states[0, head].float().cpu()

    return compress_kv(model, spec_, calibration, **layout)


@pytest.mark.parametrize(
    "codec, bits, layout",
    [
        ("turboquant_mse", 3, dict()),
        ("turboquant_mse", 4, dict(protocol="prefill_exact", sink_tokens=1, recent_window=2)),
        ("turboquant_prod", 4, dict(sink_tokens=2)),
    ],
)
def test_centered_codes_on_the_kernel_path_equal_the_reference_path(codec, bits, layout, monkeypatch):
    """Codes of x − μ (`codec.center=true`): the kernels attend over them with each side's Πμ, adding
    scaling·q·μ_k to every score and μ_v to the output, as the reference's codec.score and dequantize do."""
    model = biased()
    chunks = [ids(21), ids(1, 2), ids(3, 4)]

    def logits(kernels):
        cache = centered_cache(model, codec, bits, kernels=kernels, **layout)
        with torch.no_grad():
            return torch.cat([model(c, cache=cache).logits.double() for c in chunks], 1), cache

    original = decode.decode_attention

    def leaving_out(side):  # the kernel path with one side's mean term missing
        def attention(*args, **kwargs):
            return original(*args, **{**kwargs, f"{side}_mean": None})

        return attention

    with monkeypatch.context() as patch:
        kernels_only(patch)
        got, cache = logits("triton")
        missing = {}
        for side in ("key", "value"):
            patch.setattr(decode, "decode_attention", leaving_out(side))
            missing[side], _ = logits("triton")
    want, reference = logits("torch")
    assert all(layer.rotated_means["key"] is not None for layer in cache.layers)
    assert_same(got, want)
    far = 20 * TOLERANCE * want.abs().max()
    assert (missing["value"] - want).abs().max() > far
    # the key term moves the codes' log-sum-exp, which counts only against exact tokens (past roundoff)
    if layout:
        assert (missing["key"] - want).abs().max() > 2 * TOLERANCE * want.abs().max()
    assert cache.nbytes() == {**reference.nbytes(), "allocated": cache.nbytes()["allocated"]}


@pytest.mark.parametrize("codec, dtype", [("turboquant_mse", torch.float32), ("turboquant_prod", torch.float32),
                                          ("turboquant_mse", torch.bfloat16)])  # fmt: skip
def test_the_fused_quantize_codes_x_minus_the_mean(codec, dtype, monkeypatch):
    """`_quantize` (the fused kernel, not the codec) on centered codecs stores what Centered.quantize does,
    for a bf16 model too (its exact ±1 product, less the mean's)."""
    model = biased().to(dtype)
    cache = centered_cache(model, codec, 4, kernels="triton")
    with torch.no_grad():
        model(ids(5), cache=cache)
    layer = cache.layers[0]
    states = (3 * torch.randn(2, 2, 7, 32, generator=torch.Generator().manual_seed(3))).to(DEVICE, dtype)
    got = dict(zip(layer.packed["key"].fields, layer._quantize("key", states), strict=True))
    assert layer.packed["key"].sign_magnitude == (codec == "turboquant_mse")  # 4-bit MSE codes: as labels
    if layer.packed["key"].sign_magnitude:
        got["indices"] = sign_magnitude(got["indices"])
    for h, centered in enumerate(layer.codecs["key"]):
        want = centered.quantize(states[:, h])
        same = (got["indices"][:, h] == want.indices).float().mean()
        assert same > 0.98, same  # a code may differ at a boundary tie (fp32 round-off of the rotation)
        torch.testing.assert_close(got["norms"][:, h].float(), want.norms.float(), rtol=2e-3, atol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_4_bit_codes_are_stored_as_sign_magnitude_labels_and_read_back_as_the_codecs(bits):
    model = tiny()
    cache = compress_kv(model, spec(bits), kernels="triton")
    with torch.no_grad():
        model(ids(3), cache=cache)
        cache.reset()  # a reset cache stores and reads its codes as a new one does
        model(ids(5), cache=cache)
    layer, held = cache.layers[0], 5
    states = (2 * torch.randn(1, 2, 7, 32, generator=torch.Generator().manual_seed(4))).to(DEVICE)
    fields = layer._quantize("key", states)
    layer.packed["key"].append(*fields)
    assert layer.packed["key"].sign_magnitude == (bits == 4)
    for h, codec in enumerate(layer.codecs["key"]):
        want = codec.quantize(states[:, h]).indices
        read = layer.segments("key", h)[0][1].indices[:, held:]  # the codec's indices, whatever is stored
        assert (read == want).float().mean() > 0.98  # a code may differ at a boundary tie
        same_bytes = (fields[0][:, h] == want).float().mean()
        assert (
            same_bytes > 0.98 if bits == 3 else same_bytes < 0.5
        )  # 4 bits: labels (indices >= 8 relabelled)


@pytest.mark.filterwarnings(  # the interpreter's numpy arithmetic: the fp16 store, float32 squares
    "ignore:overflow encountered:RuntimeWarning"
)
def test_a_prompt_whose_norms_overflow_the_norm_dtype_is_refused_on_the_kernel_path(monkeypatch):
    """The fused quantize stores an fp16-overflowing norm as inf; the prompt is refused naming the layer and
    the option (as the codec refuses it), and with float32 norms the same prompt is coded."""
    monkeypatch.undo()  # the fused quantize itself
    model = tiny()
    model.model.layers[0].self_attn.k_proj.weight.data *= 1e6  # keys' norms ~1e6, past fp16's 65 504
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="layer 0: a key vector's norm overflows norm_dtype=torch.float16"),
    ):
        model(ids(20), cache=compress_kv(model, spec(), kernels="triton"))
    cache = compress_kv(model, spec(codec_options={"norm_dtype": "float32"}), kernels="triton")
    with torch.no_grad():
        model(ids(20), cache=cache)
    norms = cache.layers[0].packed["key"].tensors["norms"][..., : cache.layers[0].packed["key"].length]
    assert torch.isfinite(norms).all() and norms.max() > 65504
    # float32 norms too overflow where the kernel's float32 sum of squares does: no advice to use float32 then
    model.model.layers[0].self_attn.k_proj.weight.data *= 1e20
    float32 = spec(codec_options={"norm_dtype": "float32"})
    with torch.no_grad(), pytest.raises(ValueError, match="float32 .*entries are beyond ~1e19"):
        model(ids(20), cache=compress_kv(model, float32, kernels="triton"))


def test_value_norms_past_fp16s_range_are_refused_on_the_kernel_path_whatever_the_norm_dtype(monkeypatch):
    """The decode kernels weight values by p·‖v‖ as fp16 operands, so a value norm past 65 504 would make the
    attention inf or NaN even where float32 norms hold it: such a prompt is refused naming the layer and the
    way out, where the same keys' norms are taken (the previous test)."""
    monkeypatch.undo()  # the fused quantize itself
    model = tiny()
    model.model.layers[0].self_attn.v_proj.weight.data *= 1e6  # values' norms ~1e6
    float32 = spec(codec_options={"norm_dtype": "float32"})
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="layer 0: a value vector's norm is past fp16's 65 504"),
    ):
        model(ids(20), cache=compress_kv(model, float32, kernels="triton"))
    with torch.no_grad():  # the PyTorch path weights them in fp32
        assert torch.isfinite(model(ids(20), cache=compress_kv(model, float32, kernels="torch")).logits).all()


@pytest.mark.filterwarnings(  # the interpreter's numpy arithmetic on the inf norm
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
@pytest.mark.parametrize("codec", ["turboquant_mse", "turboquant_prod"])
def test_a_decode_step_whose_norm_overflows_is_flagged_and_raised_by_check_norms(monkeypatch, codec):
    """A single decode token is not checked as it is coded (reading a result back would stall the GPU stream at
    every step): the fused quantize (MSE, or Prod's Stage 1) flags it on the device and `check_norms` raises naming
    the layer, as does the next chunk of several tokens (its own keys in range); a reset clears the flag."""
    monkeypatch.undo()  # the fused quantize itself
    model = tiny()
    kind = KVQuantSpec.create(codec, 3, "fast_hadamard", compress=("key", "value"), head_dim=32)
    cache = compress_kv(model, kind, kernels="triton")
    weight = model.model.layers[0].self_attn.k_proj.weight
    message = "layer 0: a key vector's norm overflows norm_dtype=torch.float16"
    with torch.no_grad():
        model(ids(20), cache=cache)
        cache.check_norms()  # every norm in range
        weight.data *= 1e6
        logits = model(ids(1, 2), cache=cache).logits  # one decode token, coded and attended
        weight.data /= 1e6
        assert not torch.isfinite(logits).all()  # what the flag is for
        with pytest.raises(ValueError, match=message):
            cache.check_norms()
        with pytest.raises(ValueError, match=message):
            model(ids(4, 3), cache=cache)
    cache.reset()
    cache.check_norms()


def test_reserved_tokens_are_allocated_at_once_and_never_regrown(monkeypatch):
    """reserve_tokens sizes the code tensors once: within it appending writes in place where the default
    grows (128 rows, then 256), the attention is unchanged, `allocated` counts the reserve (rounded to the
    kernels' 128-row blocks), a reset keeps it, and a run past it still grows."""
    model = tiny()
    chunks = [ids(100), ids(40, 2), ids(1, 3)]  # 141 tokens: past the default first capacity of 128

    def storages(reserve_tokens):
        cache = compress_kv(model, spec(), kernels="triton", reserve_tokens=reserve_tokens)
        seen, out = [], []
        with torch.no_grad():
            for chunk in chunks:
                out.append(model(chunk, cache=cache).logits.double())
                packed = cache.layers[0].packed["key"]
                seen.append((packed.indices.untyped_storage().data_ptr(), packed.indices.shape[2]))
        return cache, seen, torch.cat(out, 1)

    kernels_only(monkeypatch)
    reserved, seen, got = storages(200)
    assert len(set(seen)) == 1 and seen[0][1] == 256
    grown, seen_grown, want = storages(None)
    assert [capacity for _, capacity in seen_grown] == [128, 256, 256]
    assert_same(got, want)
    row = 32 // 8 * 3 + 2  # a 3-bit code row of head_dim 32 and its fp16 norm, per KV head and side
    assert reserved.nbytes()["stored"] == grown.nbytes()["stored"] == 2 * 2 * 141 * row
    assert reserved.nbytes()["allocated"] == 2 * 2 * 256 * row
    reserved.reset()
    assert reserved.layers[0].packed["key"].reserve == 200
    past, seen_past, _ = storages(100)  # 128 rows reserved, then grown like any other
    assert [capacity for _, capacity in seen_past] == [128, 256, 256]
    for bad in (0, -5, 2.5, "64", True):
        with pytest.raises(RuleError, match="must be a positive number of tokens"):
            compress_kv(model, spec(), reserve_tokens=bad)
    assert compress_kv(model, spec(), reserve_tokens=np.int64(64)).layers[0].reserve_tokens == 64


def test_left_padded_batch_on_the_kernel_path(monkeypatch):
    model = tiny()
    kernels_only(monkeypatch)
    short, long = ids(7, 5), ids(11, 6)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long, device=DEVICE), short], 1), long])
    mask = (
        torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 7)], 1), torch.ones(1, 11)]).long().to(DEVICE)
    )
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    together = model.generate(
        batch, attention_mask=mask, cache=compress_kv(model, spec(), kernels="triton"), **kw
    )
    alone = [
        model.generate(x, cache=compress_kv(model, spec(), kernels="triton"), **kw) for x in (short, long)
    ]
    assert torch.equal(together[0, 4:], alone[0][0]) and torch.equal(together[1], alone[1][0])


def test_without_a_rotation_the_kernels_read_plain_codes(monkeypatch):
    model = tiny()
    chunks = [ids(9), ids(1, 2)]
    with monkeypatch.context() as patch:
        kernels_only(patch)
        got, _ = run(model, chunks, "triton", spec_=spec(rotation="identity"))
    want, _ = run(model, chunks, "torch", spec_=spec(rotation="identity"))
    assert_same(got, want)


@pytest.mark.parametrize("codec", ["turboquant_mse", "turboquant_prod"])
def test_a_sliding_layer_longer_than_its_window_takes_the_reference_path(codec):
    """The reference path reads the kernel layout's codes back as the codec's own (`PackedCodes.head`)."""
    model = tiny(sliding=True)
    chunks = [ids(9), ids(1, 2), ids(1, 3)]
    spec_ = KVQuantSpec.create(codec, 4, "fast_hadamard", head_dim=32)
    got, cache = run(model, chunks, "triton", spec_)
    want, _ = run(model, chunks, "torch", spec_)
    assert cache.layers[0].packed is not None
    assert_same(got, want)


def test_kernels_triton_refuses_codes_it_cannot_read():
    model = tiny()
    with pytest.raises(RuleError, match="not plain TurboQuant-MSE"):
        run(model, [ids(3)], "triton", spec_=spec(bits=5))
    with pytest.raises(RuleError, match="kernels='fast' is not allowed"):
        compress_kv(model, spec(), kernels="fast")


@pytest.mark.parametrize("exact_keys", [1, 3])
def test_the_codes_and_exact_tokens_join_as_one_float64_softmax(exact_keys):
    """`_with_exact` against one softmax over every key in float64:
    the codes' part as one pseudo-key of logit lse and value out; a row that saw no code (lse −inf) takes
    only the exact tokens."""
    g = torch.Generator().manual_seed(exact_keys)
    batch, kv_heads, group, dim, scaling = 2, 3, 4, 8, 0.35
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    keys, values = (torch.randn(batch, kv_heads, exact_keys, dim, generator=g) for _ in range(2))
    out = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    lse = 3 * torch.randn(batch, kv_heads * group, 1, generator=g)
    lse[0, 5] = float("-inf")
    got = fused._with_exact(out, lse, query, keys, values, None, scaling)
    q = query.double().unflatten(1, (kv_heads, group))  # [B, KVH, G, 1, d]
    logits = torch.einsum("bhgtd,bhnd->bhgtn", q, keys.double()) * scaling
    logits = torch.cat([lse.double().unflatten(1, (kv_heads, group))[..., None], logits], dim=-1)
    weights = torch.softmax(logits, dim=-1)
    want = weights[..., :1] * out.double().unflatten(1, (kv_heads, group)) + torch.einsum(
        "bhgtn,bhnd->bhgtd", weights[..., 1:], values.double()
    )
    torch.testing.assert_close(got.double(), want.flatten(1, 2), rtol=0, atol=1e-5)
    assert not torch.allclose(got[0, 5], out[0, 5])  # the row without codes is the exact values' mix


def test_the_kernels_on_a_cpu_without_the_interpreter_are_refused_by_name():
    import subprocess
    import sys

    script = (
        "import torch; from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from tqlab.cache import compress_kv; from tqlab.kv import KVQuantSpec\n"
        "config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,"
        " num_attention_heads=4, num_key_value_heads=2, head_dim=32)\n"
        "model = LlamaForCausalLM(config).eval()\n"
        "spec = KVQuantSpec.create('turboquant_mse', 4, 'fast_hadamard', compress=('key', 'value'), head_dim=32)\n"
        "model(torch.tensor([[1, 2, 3]]), cache=compress_kv(model, spec, kernels='triton'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "set TRITON_INTERPRET=1 before triton is imported" in done.stderr, (
        done.stderr[-2000:]
    )
