"""Decode steps of a frozen TurboQuantCache (what a CUDA graph replays) against the eager kernel path, and
GraphDecoder's greedy tokens against an eager greedy loop. On CPU the kernels run in Triton's interpreter
and every step eagerly; on a GPU the decoder captures and replays CUDA graphs, each test runs on both decode
kernels, and prompts are long enough for several chunks per sequence."""

import pytest
import torch

pytest.importorskip("triton")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from tqlab.cache import GraphDecoder, compress_kv  # noqa: E402
from tqlab.kv import KVQuantSpec  # noqa: E402
from tqlab.registry import RuleError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MSE, PROD = "turboquant_mse", "turboquant_prod"  # Prod: its Stage-1 codes and QJL signs, one bit fewer
CENTERED = "centered"  # TurboQuant-MSE around each head's mean (codec.center=true)
PROMPT = 300 if DEVICE == "cuda" else 9
TOLERANCE = 1e-3  # of the logits' scale: the two paths split the keys into different chunks (fp16 operands)


@pytest.fixture(autouse=True, params=["tiles", "registers"] if DEVICE == "cuda" else ["tiles"])
def kernel(request, monkeypatch):
    """On a GPU every test runs on the Triton-language decode kernel and on the register-fragment one."""
    from tqlab.kernels import decode

    monkeypatch.setattr(decode, "REGISTER_KERNEL_MIN_KEYS", float("inf") if request.param == "tiles" else 0)
    return request.param


def tiny(layers: int = 1, init: float = 0.02, kv_heads: int = 2):
    """init: the weights' standard deviation; at the default a greedy tiny model repeats one token. kv_heads=1
    for the tests of the decoder's own logic (sampling, stopping): each KV head costs the interpreter a program
    per kernel."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=layers, head_dim=64,
        num_attention_heads=8, num_key_value_heads=kv_heads, initializer_range=init,
    )  # fmt: skip
    return LlamaForCausalLM(config).float().eval().to(DEVICE)


def spec(bits=4, codec="turboquant_mse"):
    return KVQuantSpec.create(codec, bits, "fast_hadamard", compress=("key", "value"), head_dim=64)


def cache_for(model, bits, codec, **layout):
    """compress_kv with `spec`; CENTERED: around means of vectors offset from the keys' and values' own."""
    if codec != CENTERED:
        return compress_kv(model, spec(bits, codec), **layout)
    centered = KVQuantSpec.create(
        MSE, bits, "fast_hadamard", compress=("key", "value"), head_dim=64, codec_options={"center": True}
    )
    offset = torch.randn(64, generator=torch.Generator().manual_seed(11))

    def calibration(side, layer, head):
        return offset + torch.randn(32, 64, generator=torch.Generator().manual_seed(head))

    return compress_kv(model, centered, calibration, **layout)


def prompt(batch=2, length=PROMPT, pad=(0, 3)):
    ids = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def gpu_only(*case):
    """A case whose layout other cases cover on the CPU (the interpreter's time is the fast suite's): on a
    GPU, where graphs are captured and replayed, it runs too."""
    return pytest.param(
        *case, marks=pytest.mark.skipif(DEVICE == "cpu", reason="covered on CPU by the others")
    )


def cpu_slow(*case):
    """A case whose layout other fast cases cover on the CPU: there it runs with the slow tests (`make
    test-slow`), on a GPU always."""
    return pytest.param(*case, marks=pytest.mark.slow if DEVICE == "cpu" else ())


@pytest.mark.parametrize(
    "protocol,bits,sinks,window,codec",
    # all_quantized without exact tokens: on the CPU, the end-token test checks it against model.generate
    [gpu_only("all_quantized", 4, 0, 0, MSE), ("prefill_exact", 4, 0, 0, MSE), cpu_slow("all_quantized", 2, 0, 0, MSE),
     cpu_slow("prefill_exact", 4, 2, 0, MSE), gpu_only("all_quantized", 4, 2, 0, MSE),
     cpu_slow("all_quantized", 3, 5, 0, MSE),
     ("all_quantized", 4, 2, 3, MSE), gpu_only("prefill_exact", 4, 0, 3, MSE), cpu_slow("prefill_exact", 3, 2, 3, MSE),
     cpu_slow("all_quantized", 4, 0, 0, PROD), ("prefill_exact", 5, 2, 3, PROD), ("prefill_exact", 4, 2, 3, CENTERED)],
)  # fmt: skip
def test_frozen_steps_equal_the_eager_kernel_path(protocol, bits, sinks, window, codec):
    """The same forced tokens into an eager cache and a frozen one (one layer: both hold the same codes),
    left padding included (the padded row's first 3 positions: 2 sinks unseen, or 3 of 5; with a window, all
    but its last prompt token, so that the window attended at the first steps starts in the padding); the frozen one takes no mask, its
    padding fixed at freeze. Thawed, it goes on past its capacity on the eager path."""
    model = tiny()
    ids, mask = prompt(pad=(0, PROMPT - 1 if window else 3))
    layout = dict(kernels="triton", protocol=protocol, sink_tokens=sinks, recent_window=window)
    eager, frozen = (cache_for(model, bits, codec, **layout) for _ in range(2))
    forced = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        for cache in (eager, frozen):
            model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache)
        frozen.freeze(ids.shape[1] + 4, starts=(mask == 0).sum(-1))
        for t in range(forced.shape[1]):
            if t == 4:
                frozen.thaw()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = positions(mask)[:, -1:]
            want = model(forced[:, t : t + 1], attention_mask=mask, position_ids=pos, cache=eager).logits
            thawed = dict(attention_mask=mask) if t == 4 else {}
            got = model(forced[:, t : t + 1], position_ids=pos, cache=frozen, **thawed).logits
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE * want.abs().max())
            if t == 3:  # frozen, the same bytes held (codes, sinks, window, the last token)
                assert frozen.nbytes()["stored"] == eager.nbytes()["stored"]
    assert frozen.get_seq_length() == eager.get_seq_length()
    for cache in (eager, frozen):
        cache.layers[0].settle()  # prefill_exact holds the last token exact until the next call
    assert frozen.nbytes()["stored"] == eager.nbytes()["stored"]


def test_a_step_whose_attention_never_ran_is_coded_at_the_next_update_thaw_or_set_length():
    """Without a window a frozen update leaves its quantize to the step's attention (`_start_step`, with the
    queries' rotation); if no attention comes, the next update, thaw or set_length codes it (an eager step's:
    only a capture's leftover never ran and is dropped): the same codes at the same device-side counts as steps
    that ran their attention."""
    model = tiny(kv_heads=1)
    caches = [compress_kv(model, spec(), kernels="triton") for _ in range(3)]
    generator = torch.Generator().manual_seed(5)
    prompt_states = [torch.randn(2, 1, 9, 64, generator=generator).to(DEVICE) for _ in "kv"]
    states = [torch.randn(2, 1, 1, 64, generator=generator).to(DEVICE) for _ in range(4)]  # k, v of two steps
    query = torch.randn(2, 8, 1, 64, generator=generator).to(DEVICE)
    for cache in caches:
        cache.layers[0].update(*prompt_states)  # the prompt, without a model's attention
        cache.freeze(9 + 4)
    attended, *left = (cache.layers[0] for cache in caches)
    held = int(attended._codes_held)
    for step in range(2):
        attended.update(*states[2 * step : 2 * step + 2])
        attended._start_step(query)
        for layer in left:  # no attention: the first step is coded by the second's update
            layer.update(*states[2 * step : 2 * step + 2])
    assert all(layer._starting is not None and int(layer._codes_held) == held + 1 for layer in left)
    caches[1].thaw()  # codes the second
    caches[2].set_length(9 + 2)  # likewise
    assert all(layer._starting is None for layer in left)
    for layer in (attended, *left):
        assert int(layer._codes_held) == held + 2 and layer._read_lengths.tolist() == [held + 2] * 2
        for side in ("key", "value"):
            for name, tensor in attended.packed[side].tensors.items():
                got = layer.packed[side].tensors[name][:, :, : held + 2]
                assert torch.equal(got, tensor[:, :, : held + 2]), name


@pytest.mark.parametrize("protocol", ["all_quantized", "prefill_exact"])
def test_a_cache_thawed_before_any_frozen_step_is_the_eager_one(protocol):
    model = tiny()
    ids, mask = prompt()
    layout = dict(kernels="triton", protocol=protocol, sink_tokens=2, recent_window=3)
    eager, frozen = compress_kv(model, spec(), **layout), compress_kv(model, spec(), **layout)
    forced = torch.randint(0, 97, (2, 2), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        for cache in (eager, frozen):
            model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache)
        frozen.freeze(ids.shape[1] + 4, starts=(mask == 0).sum(-1))
        frozen.thaw()
        for t in range(forced.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            kw = dict(attention_mask=mask, position_ids=positions(mask)[:, -1:])
            want = model(forced[:, t : t + 1], cache=eager, **kw).logits
            got = model(forced[:, t : t + 1], cache=frozen, **kw).logits
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE * want.abs().max())
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


@pytest.mark.parametrize(
    "protocol,sinks,window,codec",
    # all_quantized without exact tokens: on the CPU, the end-token test checks it against model.generate
    [cpu_slow("all_quantized", 0, 0, MSE), gpu_only("prefill_exact", 0, 0, MSE), gpu_only("prefill_exact", 4, 0, MSE),
     gpu_only("all_quantized", 2, 3, MSE), ("prefill_exact", 2, 3, MSE), gpu_only("all_quantized", 2, 3, PROD)],
)  # fmt: skip
def test_graph_decoder_generates_the_eager_greedy_tokens(protocol, sinks, window, codec):
    model = tiny(layers=2, init=0.1)
    ids, mask = prompt()
    layout = dict(kernels="triton", protocol=protocol, sink_tokens=sinks, recent_window=window)
    want = eager_greedy(model, compress_kv(model, spec(4, codec), **layout), ids, mask, 4)
    cache = compress_kv(model, spec(4, codec), **layout)
    decoder = GraphDecoder(model, cache)
    got = decoder.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(got, want)
    held = ids.shape[1] + 3  # the last new token is not fed back
    assert cache.get_seq_length() == held
    # exact: the sinks, the window, and under prefill_exact with a window the last token fed
    codes = held - sinks - window - (protocol == "prefill_exact" and window > 0)
    assert all(layer._codes_held.item() == layer.packed["key"].length == codes for layer in cache.layers)
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
    model = tiny()
    ids, _ = prompt(length=9, pad=(0, 0))
    with pytest.raises(RuleError, match="GraphDecoder needs a TurboQuantCache"):
        GraphDecoder(model, DynamicCache(config=model.config))
    for layout, match in [
        (
            dict(recent_window=9),
            "layer 0: its 9 tokens leave nothing to code beyond its 0 sink tokens and 9-token",
        ),
        (dict(sink_tokens=5, recent_window=4), "beyond its 5 sink tokens and 4-token window"),
        (dict(kernels="torch"), "layer 0: its codes are not the Triton kernels'"),
    ]:
        cache = compress_kv(model, spec(), **{"kernels": "triton", **layout})
        with torch.no_grad():
            model(ids, cache=cache)
        held = cache.nbytes()
        with pytest.raises(RuleError, match=match):
            cache.freeze(64)
        assert cache.nbytes() == held and not any(layer.static for layer in cache.layers)
    wide = LlamaConfig(
        vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=1, head_dim=64,
        num_attention_heads=64, num_key_value_heads=1,
    )  # fmt: skip
    wide_model = LlamaForCausalLM(wide).float().eval().to(DEVICE)  # 64 query heads per KV head
    cache = compress_kv(wide_model, spec(), kernels="triton")
    with torch.no_grad():
        wide_model(ids, cache=cache)  # eagerly: the reference attention, the kernel taking at most 32 rows
    with pytest.raises(RuleError, match="64 query heads per KV head exceed the decode kernel's 32 rows"):
        cache.freeze(64)
    cache = compress_kv(model, spec(), kernels="triton")
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(RuleError, match="capacity=4 is less than the 9 tokens"):
        cache.freeze(4)
    with pytest.raises(ValueError, match=r"starts has shape \(3,\); expected \(2,\)"):
        cache.freeze(64, starts=torch.zeros(3))
    cache = compress_kv(model, spec(), kernels="triton")
    decoder = GraphDecoder(model, cache)
    with pytest.raises(RuleError, match="after prefill"):
        decoder.decode(1)
    decoder.prefill(ids, max_new_tokens=4)
    with pytest.raises(RuleError, match=r"layer 0: it is frozen already \(cache.thaw\(\) first\)"):
        cache.freeze(64)
    with pytest.raises(RuleError, match="4 more steps exceed the 3"):
        decoder.decode(4)
    with pytest.raises(RuleError, match="fresh cache"):
        decoder.prefill(ids)
    decoder.decode(1)
    with torch.no_grad(), pytest.raises(RuleError, match="frozen for one token per step"):
        model(ids[:, :2], cache=cache)
    with torch.no_grad():
        model(ids[:, :1], cache=cache)  # a frozen cache fed eagerly: right, but no longer the decoder's
    with pytest.raises(RuleError, match="the cache changed"):
        decoder.decode(1)
    with torch.no_grad():
        for _ in range(2):  # to the capacity, 9 + 4 tokens
            model(ids[:, :1], cache=cache)
    with torch.no_grad(), pytest.raises(RuleError, match="frozen for one token per step and 13 tokens"):
        model(ids[:, :1], cache=cache)
    cache.thaw()
    with torch.no_grad():
        model(ids[:, :1], cache=cache)  # thawed: the eager path, growing past the frozen capacity
    with pytest.raises(ValueError, match="left padding"):
        GraphDecoder(model, compress_kv(model, spec(), kernels="triton")).prefill(
            ids, torch.tensor([[1] * 8 + [0]] * 2, device=DEVICE)
        )


def warped_distribution(logits, temperature, top_k, top_p):
    """float64 brute force of transformers' temperature → top-k → top-p filtering, then softmax."""
    scores = logits.double() / temperature
    order = scores.argsort(descending=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:top_k]] = True
    probs = torch.where(keep, scores, -torch.inf).softmax(-1)
    below = 0.0  # probability of the tokens less likely than this one: dropped while it is ≤ 1 − top_p
    for token in order.flip(0):
        below += probs[token].item()
        if below <= 1 - top_p and token != order[0]:
            keep[token] = False
    return torch.where(keep, scores, -torch.inf).softmax(-1)


def test_sampled_tokens_follow_the_warped_distribution():
    from scipy.stats import chisquare

    from tqlab.cache.graphs import pick_tokens, sampling_warpers

    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, -0.5, 1.9, -1.0, 0.0, 1.0])
    temperature, top_k, top_p = 0.7, 6, 0.8
    want = warped_distribution(logits, temperature, top_k, top_p)
    assert 2 < (want > 0).sum() < top_k  # top-k and top-p both cut something
    warpers = sampling_warpers(True, temperature, top_k, top_p)  # what GraphDecoder samples with
    torch.manual_seed(3)
    draws = 40_000
    tokens = pick_tokens(logits.expand(draws, -1).to(DEVICE), warpers).cpu()
    counts = torch.bincount(tokens.flatten(), minlength=logits.numel()).double()
    assert counts[want == 0].sum() == 0
    kept = want > 0
    assert chisquare(counts[kept], draws * want[kept]).pvalue > 1e-3


def ends_at(free, early, late):
    """End tokens (t0, t1) and where rows 0 and 1 first produce one of them (i0 in `early`, i1 in `late`),
    chosen from free-running greedy tokens [2, n]."""
    for i0 in early:
        for i1 in late:
            t0, t1 = free[0, i0].item(), free[1, i1].item()
            before0, through1 = free[0, :i0].tolist(), free[1, : i1 + 1].tolist()
            if t0 != t1 and t0 not in before0 + through1 and t1 not in before0 + through1[:-1]:
                return (t0, t1), (i0, i1)
    raise AssertionError(f"no distinct end tokens in {free.tolist()}: the tiny model repeats itself")


def test_graph_decoder_stops_at_eos_as_transformers_generate_does(monkeypatch):
    """Row 0 ends early, row 1 at the fifth to seventh new token (on a GPU: in a replayed step)."""
    from tqlab.cache import graphs

    model = tiny(init=0.1, kv_heads=1)
    ids, mask = prompt()
    new, start = 9, ids.shape[1]
    free = GraphDecoder(model, compress_kv(model, spec(), kernels="triton")).generate(ids, mask, new)
    ends, (i0, i1) = ends_at(free[:, start:], early=(1, 2, 3), late=(4, 5, 6))
    # Both rows end (decode stops at its first check after row 1's end, generate cuts), only row 0 ends (a
    # check that stops at the first finished row would cut too early), or the check never comes.
    wanted = {}  # model.generate's output per end-token list (the check interval is the decoder's alone)
    for eos, check_every in [(list(ends), 2), ([ends[0]], 2), (list(ends), 16)]:
        monkeypatch.setattr(graphs, "STOP_CHECK_EVERY", check_every)
        kw = dict(max_new_tokens=new, eos_token_id=eos, pad_token_id=96)
        if tuple(eos) not in wanted:
            cache = compress_kv(model, spec(), kernels="triton")
            wanted[tuple(eos)] = model.generate(ids, attention_mask=mask, cache=cache, do_sample=False, **kw)
        want = wanted[tuple(eos)]
        decoder = GraphDecoder(model, compress_kv(model, spec(), kernels="triton"))
        got = decoder.generate(ids, mask, **kw)
        assert torch.equal(got, want)
        if len(eos) == 2:  # cut after row 1's end; decode stopped at the first check (every 2 steps) past it
            assert got.shape[1] == start + i1 + 1
            assert decoder._left == (new - 1 - 2 * ((i1 + 1) // 2) if check_every == 2 else 0)


@pytest.mark.filterwarnings(  # the interpreter's numpy arithmetic on the inf norms
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_graph_decoder_raises_after_steps_whose_norms_overflow():
    """Frozen steps write their codes without a sync: a norm fp16 cannot hold is flagged on the device and
    raised, naming the layer, when decode returns (on a GPU the first call warms up and captures the graph in
    range, so the overflow comes from replays alone), or, for a one-token prompt, when prefill returns."""
    model = tiny(kv_heads=1)
    ids, mask = prompt()
    decoder = GraphDecoder(model, compress_kv(model, spec(), kernels="triton"))
    decoder.prefill(ids, mask, max_new_tokens=6)
    decoder.decode(3)  # in range: no error
    assert DEVICE == "cpu" or decoder._graph is not None
    model.model.layers[0].self_attn.k_proj.weight.data *= 1e6
    message = "layer 0: a key vector's norm overflows norm_dtype=torch.float16"
    with pytest.raises(ValueError, match=message):
        decoder.decode(2)
    # a prompt of one token is coded alone too, and checked when prefill returns
    with pytest.raises(ValueError, match=message):
        GraphDecoder(model, compress_kv(model, spec(), kernels="triton")).prefill(
            ids[:1, -1:], max_new_tokens=2
        )


def forced_logits(model, cache, ids, mask, forced):
    """Eager logits before each forced token [B, n, V]: the prompt's last, then each forced token's."""
    out = []
    with torch.no_grad():
        out.append(model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache).logits[:, -1:])
        for t in range(forced.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = positions(mask)[:, -1:]
            out.append(model(forced[:, t : t + 1], attention_mask=mask, position_ids=pos, cache=cache).logits)
    return torch.cat(out, dim=1)


def test_graph_decoder_samples_from_the_top_k():
    model = tiny(kv_heads=1)
    ids, mask = prompt()
    new, top_k = 5, 3
    runs = []
    for _ in range(2):
        torch.manual_seed(4)
        decoder = GraphDecoder(model, compress_kv(model, spec(), kernels="triton"))
        runs.append(decoder.generate(ids, mask, new, do_sample=True, temperature=1.5, top_k=top_k))
    assert torch.equal(runs[0], runs[1])  # seeded
    sampled = runs[0][:, ids.shape[1] :]
    # Each sampled token is among the top k of the eager path's logits for the sequence so far, and not
    # always the first of them.
    steps = forced_logits(model, compress_kv(model, spec(), kernels="triton"), ids, mask, sampled)
    assert not torch.equal(sampled, steps.argmax(-1))
    chosen = steps.gather(-1, sampled[..., None])[..., 0]
    kth = steps.topk(top_k, dim=-1).values[..., -1]
    assert (chosen >= kth - TOLERANCE * steps.abs().max()).all()


def test_sampling_and_eos_arguments_are_checked_before_the_prompt_runs():
    model = tiny()
    ids, _ = prompt(length=9, pad=(0, 0))
    for kw, match in [
        (dict(temperature=0.5), "apply with do_sample=True only"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(eos_token_id=97), "eos_token_id=97 is not a token of the model's 97-token vocabulary"),
        (dict(eos_token_id=[]), "empty"),
        (dict(pad_token_id=0), "needs eos_token_id"),
    ]:
        cache = compress_kv(model, spec(), kernels="triton")
        with pytest.raises(ValueError, match=match):
            GraphDecoder(model, cache).generate(ids, max_new_tokens=2, **kw)
        assert cache.get_seq_length() == 0
