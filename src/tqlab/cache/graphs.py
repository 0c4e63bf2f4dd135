"""Greedy decoding with every decode step replayed from one CUDA graph.

    cache = compress_kv(model, spec)
    tokens = GraphDecoder(model, cache).generate(input_ids, attention_mask, max_new_tokens=256)

An eager decode step of a small model is mostly host work: Python and a kernel launch per op, per layer.
A CUDA graph records one step's kernels once and replays them with a single launch, so the step costs what
the GPU does. That needs a step whose work never depends on a host value: `TurboQuantCache.freeze` makes
its layers write each token's codes at a count kept on the device and attend over the whole capacity with
the lengths read on the device (`decode_attention(..., static_launch=True)`); transformers' StaticCache is
built that way already and serves as the bf16 baseline. The prompt is prefilled eagerly; the first
WARMUP_STEPS steps run eagerly too (they compile kernels and size the launch), then one is captured and
replayed for the rest. Off CUDA (or with graphs=False) every step runs eagerly through the same frozen path.

Greedy only, exactly max_new_tokens new tokens: stopping at an end-of-sequence token would need the host to
look at each token. Prompts may be left-padded (TurboQuantCache only; StaticCache batches must be unpadded).
One decoder per cache, and one cache per prompt batch.
"""

from __future__ import annotations

import torch
from transformers import StaticCache

from ..registry import RuleError
from .cache import TurboQuantCache

# Eager steps before the capture: the first compiles the kernels and measures the decode kernel's residency,
# the second launches at the split count that measurement gives (and compiles the merge for it), so that
# nothing compiles while the graph records.
WARMUP_STEPS = 2


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

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask=None, max_new_tokens: int = 32
    ) -> torch.Tensor:
        """The prompt [B, P] followed by max_new_tokens greedy tokens, [B, P + max_new_tokens]."""
        first = self.prefill(input_ids, attention_mask, max_new_tokens)
        return torch.cat([input_ids, first, self.decode(max_new_tokens - 1)], dim=1)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask=None, max_new_tokens: int = 32) -> torch.Tensor:
        """Run the prompt eagerly, freeze the cache for max_new_tokens more, return the first new token [B, 1]."""
        if self._tokens is not None or self.cache.get_seq_length():
            raise RuleError(
                "GraphDecoder.prefill takes a fresh cache: one decoder and one cache per prompt batch"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
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
        token = logits[:, -1:].argmax(-1)
        if isinstance(self.cache, TurboQuantCache):
            self.cache.freeze(capacity, starts)
        self._tokens = token.clone()  # the next step's input, then its output: the graph's static buffers
        self._positions = (length - starts)[:, None].clone()
        self._length, self._left = length, max_new_tokens - 1
        return token

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """The next `steps` greedy tokens, [B, steps]."""
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
        return out

    def _step(self) -> torch.Tensor:
        """One decode step on the static buffers: what the graph records."""
        logits = self.model(
            self._tokens, position_ids=self._positions, cache=self.cache, logits_to_keep=1
        ).logits
        self._tokens.copy_(logits[:, -1:].argmax(-1))
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
