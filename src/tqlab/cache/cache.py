"""TurboQuantCache: a transformers `Cache` that stores keys and values as appended packed codes.

from tqlab.cache import compress_kv
cache = compress_kv(model, KVQuantSpec.create("turboquant_mse", bits=3, rotation="fast_hadamard"))
model.generate(**inputs, cache=cache)

Each attention layer keeps, per KV head, the codes of every token it has seen, built by the one builder
(`tqlab.kv.builder.CodecBank`) from the same validated spec as `eval.py`'s codecs; a side the spec leaves
exact is stored in the model's dtype. Tokens are encoded once, when written, and never re-quantized.

Protocols: "all_quantized" (default, the papers'): every query, the prompt's included, attends only to what is
stored. "prefill_exact" (what vLLM and transformers' quantized cache do): the tokens of each forward call
attend to their own keys and values exactly and to earlier tokens through the codes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from ..capture.models import architecture_facts
from ..kv.builder import CodecBank
from ..kv.spec import KVQuantSpec
from ..registry import PROTOCOLS, RuleError
from . import attention
from .codes import concat, token_slice

ATTENTION_LAYERS = ("full_attention", "sliding_attention")


class TurboQuantLayer(CacheLayerMixin):
    """One attention layer's cache: per KV head, codes (or exact states for a side kept exact; with no bank,
    an exact layer that still keeps every token, so that all layers of a kind share one mask size)."""

    is_croppable = False
    supports_early_init = False

    def __init__(
        self, bank: CodecBank | None, layer_idx: int, num_kv_heads: int, protocol: str, sliding_window=None
    ):
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.sliding_window = layer_idx, num_kv_heads, sliding_window
        self.is_sliding = sliding_window is not None
        self.prefill_exact = protocol == "prefill_exact"
        self.bank, self.length = bank, 0
        self.key_codecs = [None] * num_kv_heads
        self.value_codecs = [None] * num_kv_heads
        self._codes = {"key": [None] * num_kv_heads, "value": [None] * num_kv_heads}
        self._exact: dict[str, torch.Tensor | None] = {"key": None, "value": None}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        for h in range(self.num_kv_heads if self.bank is not None else 0):
            self.key_codecs[h] = self.bank.get("key", self.layer_idx, h, self.device)
            self.value_codecs[h] = self.bank.get("value", self.layer_idx, h, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Encode the new tokens ([B, KVH, T, d]) and append them; return them marked with this layer, so that
        the tqlab attention function reads the codes."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for side, states, codecs in (
            ("key", key_states, self.key_codecs),
            ("value", value_states, self.value_codecs),
        ):
            if codecs[0] is None:
                old = self._exact[side]
                self._exact[side] = states if old is None else torch.cat([old, states], dim=-2)
                continue
            for h, codec in enumerate(codecs):
                self._codes[side][h] = concat(self._codes[side][h], codec.quantize(states[:, h]))
        self.length += key_states.shape[-2]
        marked = key_states.view_as(key_states)
        setattr(marked, attention.LAYER_MARK, self)
        return marked, value_states

    def stored(self, side: str, head: int, start: int, stop: int):
        """(code, None) or (None, exact states [B, T, d]) of tokens start..stop−1 of one KV head."""
        if self._exact[side] is not None:
            return None, self._exact[side][:, head, start:stop]
        return token_slice(self._codes[side][head], start, stop), None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # every token is kept; a sliding layer's mask hides old ones

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self._codes = {side: [None] * self.num_kv_heads for side in self._codes}
        self._exact = {"key": None, "value": None}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("beam search is not supported over compressed codes; use greedy or sampling")

    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes (payload, norms, side information) and exact states."""
        codes = sum(c.nbytes for side in self._codes.values() for c in side if c is not None)
        exact = sum(t.numel() * t.element_size() for t in self._exact.values() if t is not None)
        return codes + exact


class TurboQuantCache(Cache):
    """A Cache whose attention layers are TurboQuantLayers; layers in `exact_layers` (and layers of kinds this
    cache does not compress) are transformers' own dynamic layers, kept in the model's dtype."""

    def __init__(self, layers: list, bank: CodecBank | None):
        super().__init__(layers=layers)
        self.bank = bank  # None: compression off, every layer is transformers' own

    @classmethod
    def from_spec(
        cls,
        config,
        spec: KVQuantSpec | None,
        protocol: str = "all_quantized",
        exact_layers: tuple = (),
        calibration=None,
    ) -> TurboQuantCache:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not one of {PROTOCOLS}")
        if spec is not None and any(s.codec.name == "kivi" for s in spec.sides().values()):
            raise RuleError(
                "codec=kivi groups keys over 32 tokens and keeps recent tokens in full precision; the cache "
                "does not model that window yet: evaluate KIVI with task=eval"
            )
        text = config.get_text_config(decoder=True)
        arch = architecture_facts(text)
        head_dim, num_kv_heads = arch["head_dim"], arch["num_kv_heads"]
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        n = len(layer_types)
        outside = [i for i in exact_layers if not -n <= i < n]
        if outside:
            raise RuleError(
                f"exact_layers={list(exact_layers)}: {outside} are not layers of this {n}-layer model"
            )
        kinds = list(zip(layer_types, layer_kwargs, strict=True))
        if spec is None:  # compression off: transformers' own layers, and the attention is exactly SDPA
            return cls([DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs) for kind, kwargs in kinds], None)
        bank = CodecBank(spec, head_dim, calibration)
        exact = {i % n for i in exact_layers}
        layers = []
        for i, (kind, kwargs) in enumerate(kinds):
            if kind in ATTENTION_LAYERS:  # an exact layer keeps every token too: one mask size per layer kind
                layer_bank = None if i in exact else bank
                layers.append(
                    TurboQuantLayer(layer_bank, i, num_kv_heads, protocol, kwargs.get("sliding_window"))
                )
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        return cls(layers, bank)

    def nbytes(self) -> dict:
        """Real bytes: the stored codes and exact states per token, and the per-layer constants apart."""
        stored = 0
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                stored += layer.nbytes()
            elif getattr(layer, "keys", None) is not None:
                stored += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        units = [
            (layer.layer_idx, h)
            for layer in self.layers
            if isinstance(layer, TurboQuantLayer) and layer.is_initialized and layer.bank is not None
            for h in range(layer.num_kv_heads)
        ]
        device = next(
            (layer.device for layer in self.layers if getattr(layer, "is_initialized", False)), "cpu"
        )
        return {"stored": stored, "constants": self.bank.constant_nbytes(units, device) if units else 0}


def compress_kv(
    model,
    spec: KVQuantSpec | None,
    protocol: str = "all_quantized",
    exact_layers: tuple = (),
    calibration=None,
):
    """Switch `model` to attention that reads codes and return a fresh TurboQuantCache for it: pass it as
    `model.generate(..., cache=cache)` or `model(..., cache=cache)`. One cache per sequence batch; spec=None
    gives the uncompressed cache under the same attention function (exactly SDPA)."""
    attention.register()
    model.set_attn_implementation(attention.NAME)
    return TurboQuantCache.from_spec(model.config, spec, protocol, exact_layers, calibration)
