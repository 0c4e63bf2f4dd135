"""Decoding with every decode step replayed from one CUDA graph.

    cache = compress_kv(model, spec)
    tokens = GraphDecoder(model, cache).generate(input_ids, attention_mask, max_new_tokens=256)
    tokens = GraphDecoder(model, compress_kv(model, spec)).generate(
        input_ids, attention_mask, 256, do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=2
    )

An eager decode step of a small model is mostly host work: Python and a kernel launch per op, per layer.
A CUDA graph records one step's kernels once and replays them with a single launch, so the step costs what
the GPU does. That needs a step whose work never depends on a host value: `TurboQuantCache.freeze` makes
its layers write each token's codes at a count kept on the device and attend over the whole capacity with
the lengths read on the device (`decode_attention(..., static_launch=True)`); transformers' StaticCache is
built that way already and serves as the bf16 baseline. The prompt is prefilled eagerly; the first
WARMUP_STEPS steps run eagerly too (they compile kernels and size the launch), then one is captured and
replayed for the rest. Off CUDA (or with graphs=False) every step runs eagerly through the same frozen path.

Greedy, or sampled after transformers' temperature / top-k / top-p warpers (in that order, as
`model.generate` applies them) by the exponential race argmax(p / E), E ~ Exponential(1): the law of
torch.multinomial, drawn without a host sync so that it can be captured (seed with torch.manual_seed).
With eos_token_id, a sequence that produced one gets pad_token_id from then on (transformers' rule), and the
host looks at the finished flags every STOP_CHECK_EVERY steps, stopping once all are set; the output is then
cut after the step in which the last sequence ended, as `model.generate` returns it. Prompts may be
left-padded (TurboQuantCache only; StaticCache batches must be unpadded). One decoder per cache, and one
cache per prompt batch.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..registry import RuleError
from .cache import TurboQuantCache

# Eager steps before the capture: the first compiles the kernels and measures the decode kernel's residency,
# the second launches at the split count that measurement gives (and compiles the merge for it), so that
# nothing compiles while the graph records.
WARMUP_STEPS = 2
STOP_CHECK_EVERY = 16  # decode steps between host reads of the finished flags (each read waits for the GPU)


def sampling_warpers(do_sample: bool, temperature: float, top_k, top_p) -> LogitsProcessorList | None:
    """transformers' warpers in `model.generate`'s order (temperature, top-k, top-p), or None for greedy.
    The warpers check their own arguments (a clear ValueError for a bad one)."""
    if not do_sample:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("temperature, top_k and top_p apply with do_sample=True only")
        return None
    warpers = [] if temperature == 1.0 else [TemperatureLogitsWarper(temperature)]
    warpers += [] if top_k is None else [TopKLogitsWarper(top_k)]
    warpers += [] if top_p is None else [TopPLogitsWarper(top_p)]
    return LogitsProcessorList(warpers)


def pick_tokens(logits: torch.Tensor, warpers: LogitsProcessorList | None) -> torch.Tensor:
    """[B, V] logits → [B, 1] tokens: the argmax, or with warpers a sample of softmax(warpers(logits)) in fp32."""
    if warpers is None:
        return logits.argmax(-1, keepdim=True)
    probs = warpers(None, logits.float()).softmax(-1)
    # P(argmax p_i / E_i = j) = p_j for i.i.d. E ~ Exponential(1); the clamp keeps 0 / 0 (a NaN) out
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / race).argmax(-1, keepdim=True)


class GraphDecoder:
    def __init__(self, model, cache, graphs: bool | None = None):
        if not isinstance(cache, TurboQuantCache | StaticCache):
            raise RuleError(
                f"GraphDecoder needs a TurboQuantCache (compress_kv) or transformers' StaticCache, not "
                f"{type(cache).__name__}: a growing cache cannot be replayed from a graph"
            )
        self.model, self.cache = model, cache
        on_cuda = next(model.parameters()).is_cuda
        self.graphs = on_cuda if graphs is None else graphs
        if self.graphs and not on_cuda:
            raise RuleError("graphs=True needs the model on a CUDA device")
        self._graph, self._warm, self._tokens, self._positions = None, 0, None, None
        self._length = self._left = 0  # tokens per sequence in the cache; steps prefill left room for
        self._warpers = self._eos = self._pad = self._finished = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, max_new_tokens: int = 32, **sampling):
        """The prompt [B, P] followed by up to max_new_tokens new tokens, [B, P + n]: n = max_new_tokens
        unless every sequence ended (eos_token_id) before. sampling: `prefill`'s keywords."""
        first = self.prefill(input_ids, attention_mask, max_new_tokens, **sampling)
        new = first
        if max_new_tokens > 1 and not (self._finished is not None and bool(self._finished.all())):
            new = torch.cat([first, self.decode(max_new_tokens - 1)], dim=1)
        if self._eos is not None:  # cut after the step in which the last sequence ended, if all did
            ended = self._is_end(new)
            if bool(ended.any(-1).all()):
                new = new[:, : int(ended.int().argmax(-1).max()) + 1]
        return torch.cat([input_ids, new], dim=1)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask=None,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Run the prompt eagerly, freeze the cache for max_new_tokens more, return the first new token [B, 1].
        do_sample: sample (temperature, then top_k, then top_p) instead of the argmax. eos_token_id: the
        token(s) that end a sequence; pad_token_id (default: the model's generation config's, else the first
        end) fills a sequence after its end. Unlike `model.generate`, nothing comes from the generation config
        but that padding: no top-k unless asked, and no end unless eos_token_id is given (a benchmark runs
        exactly max_new_tokens steps)."""
        if self._tokens is not None or self.cache.get_seq_length():
            raise RuleError(
                "GraphDecoder.prefill takes a fresh cache: one decoder and one cache per prompt batch"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        self._warpers = sampling_warpers(do_sample, temperature, top_k, top_p)
        self._eos, self._pad = self._ends(eos_token_id, pad_token_id, input_ids.device)
        batch, length = input_ids.shape
        capacity = length + max_new_tokens
        starts = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        position_ids = None
        if attention_mask is not None:
            starts = (attention_mask == 0).sum(-1)
            left_padded = torch.arange(length, device=input_ids.device) >= starts[:, None]
            if not torch.equal(attention_mask.bool(), left_padded):
                raise ValueError("attention_mask must be left padding: zeros, then ones, in every row")
            if isinstance(self.cache, StaticCache) and bool(starts.any()):
                raise RuleError("GraphDecoder takes padded prompts with a TurboQuantCache only")
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        if isinstance(self.cache, StaticCache) and self.cache.layers[0].get_max_length() < capacity:
            raise RuleError(
                f"the StaticCache holds {self.cache.layers[0].get_max_length()} tokens; "
                f"the prompt and max_new_tokens need {capacity}"
            )
        logits = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self.cache,
            logits_to_keep=1,
        ).logits
        token = pick_tokens(logits[:, -1], self._warpers)
        if self._eos is not None:
            self._finished = self._is_end(token)  # [B, 1], a static buffer of the graph
        if isinstance(self.cache, TurboQuantCache):
            self.cache.freeze(capacity, starts)
            self.cache.check_norms()  # a prompt of one token is coded as a decode step is, unchecked
        self._tokens = token.clone()  # the next step's input, then its output: the graph's static buffers
        self._positions = (length - starts)[:, None].clone()
        self._length, self._left = length, max_new_tokens - 1
        return token

    def _ends(self, eos_token_id, pad_token_id, device):
        if eos_token_id is None:
            if pad_token_id is not None:
                raise ValueError("pad_token_id fills sequences after their end: it needs eos_token_id")
            return None, None
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        vocabulary = self.model.config.get_text_config().vocab_size
        for name, token in [*(("eos_token_id", t) for t in ids), ("pad_token_id", pad_token_id)]:
            if token is not None and not (isinstance(token, int) and 0 <= token < vocabulary):
                raise ValueError(
                    f"{name}={token!r} is not a token of the model's {vocabulary}-token vocabulary"
                )
        if not ids:
            raise ValueError("eos_token_id is an empty list")
        if pad_token_id is None:  # as model.generate: the generation config's padding, else the first end
            configured = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
            pad_token_id = configured if isinstance(configured, int) else ids[0]
        return torch.tensor(ids, device=device), pad_token_id

    def _is_end(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which tokens are one of eos_token_id (same shape, bool)."""
        return (tokens[..., None] == self._eos).any(-1)

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """The next `steps` tokens, [B, steps] — fewer if every sequence has ended (eos_token_id): the host
        checks after every STOP_CHECK_EVERY steps of this call, so up to STOP_CHECK_EVERY steps of padding
        follow the last end. Raises ValueError, naming the layer, if a step stored a key or value norm that
        overflows its norm_dtype (`TurboQuantCache.check_norms`, read once the steps are done)."""
        if self._tokens is None:
            raise RuleError("GraphDecoder.decode comes after prefill")
        if steps > self._left:
            raise RuleError(
                f"{steps} more steps exceed the {self._left} that prefill's max_new_tokens left room for"
            )
        if isinstance(self.cache, TurboQuantCache) and (
            not self.cache.frozen or self.cache.get_seq_length() != self._length
        ):
            raise RuleError(
                "the cache changed since this decoder's last step (thawed, reset or fed eagerly): its graph would "
                "write where the cache no longer is; decode with a fresh cache and decoder"
            )
        out = torch.empty(self._tokens.shape[0], steps, dtype=torch.long, device=self._tokens.device)
        for i in range(steps):
            out[:, i : i + 1] = self._next()
            self._left -= 1
            if self._eos is not None and (i + 1) % STOP_CHECK_EVERY == 0 and bool(self._finished.all()):
                out = out[:, : i + 1]
                break
        # a norm that overflowed in one of these steps (flagged on the device) made its tokens come from NaN
        if isinstance(self.cache, TurboQuantCache):
            self.cache.check_norms()
        return out

    def _step(self) -> torch.Tensor:
        """One decode step on the static buffers: what the graph records."""
        logits = self.model(
            self._tokens, position_ids=self._positions, cache=self.cache, logits_to_keep=1
        ).logits
        token = pick_tokens(logits[:, -1], self._warpers)
        if self._eos is not None:
            token = token.masked_fill(self._finished, self._pad)
            self._finished |= self._is_end(token)
        self._tokens.copy_(token)
        self._positions.add_(1)
        return self._tokens

    def _next(self) -> torch.Tensor:
        if not self.graphs:
            self._step()
        elif self._graph is None and self._warm < WARMUP_STEPS:
            side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self._warm += 1
        else:
            if self._graph is None:
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        self._step()
                finally:  # the capture ran the step's Python (the cache's counts) but none of its kernels
                    self._set_length(self._length)
                self._graph = graph
            self._graph.replay()
            self._set_length(self._length + 1)
        self._length += 1
        return self._tokens

    def _set_length(self, tokens: int) -> None:
        if isinstance(self.cache, TurboQuantCache):
            self.cache.set_length(tokens)
