"""Record the queries, keys and values every attention layer really uses, through transformers'
attention interface (no per-model copy of attention code).

While an `AttentionRecorder` is active, the model runs a registered attention function that forwards to
transformers' SDPA attention and keeps, per layer: the post-RoPE (and post q/k-norm) queries [B, H, T, D],
keys and values [B, KVH, T, D] exactly as passed to attention, the softmax scale, and the sliding window.
Layers that never call attention (linear-attention or other hybrid layers) are simply absent.
"""

from __future__ import annotations

import contextvars
import dataclasses

import torch

from .models import check_supported

CAPTURE_ATTENTION = "tqlab_capture"
_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "tqlab_recorder", default=None
)


@dataclasses.dataclass
class LayerRecord:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    sliding_window: int | None
    output: torch.Tensor | None = None  # attention output before o_proj, [B, T, H, D], when asked for


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.record(module, query, key, value, kwargs, out)
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, sdpa_mask)


class AttentionRecorder:
    """with AttentionRecorder(model) as rec: model(input_ids); rec.layers[i].key …"""

    def __init__(self, model, layers: list[int] | None = None, record_output: bool = False, dtype=None):
        self.model, self.wanted = model, None if layers is None else set(layers)
        self.record_output, self.dtype = record_output, dtype
        self.layers: dict[int, LayerRecord] = {}

    def record(self, module, query, key, value, kwargs, out) -> None:
        idx = module.layer_idx
        if self.wanted is not None and idx not in self.wanted:
            return

        def keep(t):
            return t.detach().to(self.dtype or t.dtype, copy=True)

        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        self.layers[idx] = LayerRecord(
            keep(query),
            keep(key),
            keep(value),
            float(kwargs.get("scaling", module.scaling)),
            window,
            keep(out) if self.record_output else None,
        )

    def __enter__(self) -> AttentionRecorder:
        check_supported(self.model.config, self.model.config.name_or_path or self.model.config.model_type)
        _register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(CAPTURE_ATTENTION)
        self._token = _ACTIVE.set(self)
        self.layers.clear()
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self.model.set_attn_implementation(self._previous)
