"""Decode steps of a frozen TurboQuantCache (what a CUDA graph replays) against the eager kernel path, and
GraphDecoder's greedy tokens against an eager greedy loop. On CPU the kernels run in Triton's interpreter
and the steps eagerly; on a GPU the same tests capture and replay CUDA graphs."""

import pytest
import torch

pytest.importorskip("triton")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from tqlab.cache import GraphDecoder, compress_kv  # noqa: E402
from tqlab.kv import KVQuantSpec  # noqa: E402
from tqlab.registry import RuleError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-3  # of the logits' scale: the two paths split the keys into different chunks (fp16 operands)


def tiny(layers: int = 1):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=layers, head_dim=32,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).float().eval().to(DEVICE)


def spec(bits=3):
    return KVQuantSpec.create("turboquant_mse", bits, "fast_hadamard", compress=("key", "value"), head_dim=32)


def prompt(batch=2, length=9, pad=(0, 3)):
    ids = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("protocol,bits", [("all_quantized", 3), ("prefill_exact", 4), ("all_quantized", 2)])
def test_frozen_steps_equal_the_eager_kernel_path(protocol, bits):
    """The same forced tokens into an eager cache and a frozen one (one layer: both hold the same codes),
    left padding included; the frozen one takes no mask, its padding fixed at freeze."""
    model = tiny()
    ids, mask = prompt()
    eager = compress_kv(model, spec(bits), kernels="triton", protocol=protocol)
    frozen = compress_kv(model, spec(bits), kernels="triton", protocol=protocol)
    forced = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        for cache in (eager, frozen):
            model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache)
        frozen.freeze(ids.shape[1] + forced.shape[1], starts=(mask == 0).sum(-1))
        for t in range(forced.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = positions(mask)[:, -1:]
            want = model(forced[:, t : t + 1], attention_mask=mask, position_ids=pos, cache=eager).logits
            got = model(forced[:, t : t + 1], position_ids=pos, cache=frozen).logits
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE * want.abs().max())
    assert frozen.get_seq_length() == eager.get_seq_length()
    eager.layers[0].settle()  # prefill_exact holds the last token exact until the next call
    assert frozen.nbytes()["stored"] == eager.nbytes()["stored"]


def eager_greedy(model, cache, ids, mask, new_tokens):
    out = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache).logits
        for _ in range(new_tokens):
            out.append(logits[:, -1:].argmax(-1))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(
                out[-1], attention_mask=mask, position_ids=positions(mask)[:, -1:], cache=cache
            ).logits
    return torch.cat([ids, *out], dim=1)


def test_graph_decoder_generates_the_eager_greedy_tokens():
    model = tiny(layers=2)
    ids, mask = prompt()
    want = eager_greedy(model, compress_kv(model, spec(), kernels="triton"), ids, mask, 6)
    cache = compress_kv(model, spec(), kernels="triton")
    decoder = GraphDecoder(model, cache)
    got = decoder.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + 5  # the last new token is not fed back
    if DEVICE == "cuda":
        assert decoder._graph is not None  # the later steps were replayed


def test_graph_decoder_on_transformers_static_cache():
    model = tiny(layers=2)
    ids, mask = prompt(pad=(0, 0))
    want = eager_greedy(model, DynamicCache(config=model.config), ids, mask, 5)
    model.set_attn_implementation("sdpa")
    static = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 5)
    assert torch.equal(GraphDecoder(model, static).generate(ids, max_new_tokens=5), want)


def test_what_cannot_be_frozen_is_refused_before_anything_changes():
    model = tiny(layers=2)
    ids, _ = prompt(pad=(0, 0))
    with pytest.raises(RuleError, match="GraphDecoder needs a TurboQuantCache"):
        GraphDecoder(model, DynamicCache(config=model.config))
    for layout, match in [
        (dict(recent_window=4), "layer 0: it keeps exact tokens"),
        (dict(kernels="torch"), "layer 0: its codes are not the Triton kernels'"),
    ]:
        cache = compress_kv(model, spec(), **{"kernels": "triton", **layout})
        with torch.no_grad():
            model(ids, cache=cache)
        held = cache.nbytes()
        with pytest.raises(RuleError, match=match):
            cache.freeze(64)
        assert cache.nbytes() == held and not any(layer.static for layer in cache.layers)
    cache = compress_kv(model, spec(), kernels="triton")
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(RuleError, match="capacity=4 is less than the 9 tokens"):
        cache.freeze(4)
    decoder = GraphDecoder(model, compress_kv(model, spec(), kernels="triton"))
    with pytest.raises(RuleError, match="after prefill"):
        decoder.decode(1)
    decoder.prefill(ids, max_new_tokens=3)
    with pytest.raises(RuleError, match="3 more steps exceed the 2"):
        decoder.decode(3)
    with pytest.raises(RuleError, match="fresh cache"):
        decoder.prefill(ids)
    with pytest.raises(ValueError, match="left padding"):
        GraphDecoder(model, compress_kv(model, spec(), kernels="triton")).prefill(
            ids, torch.tensor([[1] * 8 + [0]] * 2, device=DEVICE)
        )
