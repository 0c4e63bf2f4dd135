"""TurboQuantCache: a transformers `Cache` that stores keys and values as appended packed codes.

from tqlab.cache import compress_kv
cache = compress_kv(model, KVQuantSpec.create("turboquant_mse", bits=3, rotation="fast_hadamard"))
model.generate(**inputs, cache=cache)
cache.check_norms()  # on the kernels' path: raises if a decode step stored a norm its norm_dtype cannot hold

Each attention layer keeps, per KV head, the codes of every token it has seen, built by the one builder
(`tqlab.kv.builder.CodecBank`) from the same validated spec as `eval.py`'s codecs; a side the spec leaves
exact is stored in the model's dtype. Tokens are encoded once, when written, and never re-quantized.

Protocols: "all_quantized" (default, the papers'): every query, the prompt's included, attends only to what is
stored. "prefill_exact" (what vLLM and transformers' quantized cache do): the tokens of each forward call
attend to their own keys and values exactly and to earlier tokens through the codes.

On CUDA, layers whose codes are plain TurboQuant-MSE codes (2–4 bits, head_dim a power of two >= 32), or
TurboQuant-Prod codes over such a Stage 1 (3–5 bits, qjl_dim = head_dim), store them in one tensor per side
and field (`PackedCodes`), quantize with the fused Triton kernel and attend with the
Triton decode kernel (`tqlab.cache.fused`); `kernels="torch"` keeps the PyTorch reference everywhere.

Options the field found necessary (`CacheLayout`), each off by default and each counted in the bytes: whole
layers kept exact, the first `sink_tokens` of the cache kept exact (attention sinks), and a window of the
`recent_window` newest tokens kept exact, each token encoded once when it leaves the window.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from ..capture.models import architecture_facts
from ..kv.builder import CodecBank
from ..kv.layout import CacheLayout
from ..kv.spec import KVQuantSpec
from ..registry import SIDES, RuleError
from . import attention
from .codes import concat, drop_front
from .packed import PackedCodes, kernel_centroids, sign_magnitude, stage1, stored

if TYPE_CHECKING:
    from ..kernels.quantize import QuantizeLaunch

ATTENTION_LAYERS = ("full_attention", "sliding_attention")
KERNELS = ("auto", "triton", "torch")  # auto: the Triton kernels on CUDA where the codes allow them


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _capturing() -> bool:
    """Whether this thread's CUDA stream is capturing a graph (a capture records kernels without running them)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TurboQuantLayer(CacheLayerMixin):
    """One attention layer's cache. Per side and in token order: exact sink tokens, then per KV head the
    codes of the encoded tokens, then the exact tokens not encoded yet (the recent window, and under
    prefill_exact the last call's tokens until the next call). A side the spec leaves exact, and a layer
    without a bank (an exact layer, which still keeps every token so that all layers of a kind share one
    mask size), keep every token exact."""

    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        bank: CodecBank | None,
        layer_idx: int,
        num_kv_heads: int,
        layout: CacheLayout,
        sliding_window=None,
        kernels: str = "auto",
        reserve_tokens: int | None = None,
    ):
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.sliding_window = layer_idx, num_kv_heads, sliding_window
        self.is_sliding = sliding_window is not None
        self.bank, self.layout, self.length, self.kernels = bank, layout, 0, kernels
        # a sliding layer holds about a window at a time: it grows to that instead of taking the reserve
        self.reserve_tokens = 0 if self.is_sliding else reserve_tokens or 0
        self.packed = None  # {side: PackedCodes} when the Triton kernels read this layer's codes
        self.codecs = {side: [None] * num_kv_heads for side in SIDES}
        self.reset()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        for side in SIDES if self.bank is not None else ():
            self.codecs[side] = [
                self.bank.get(side, self.layer_idx, h, self.device) for h in range(self.num_kv_heads)
            ]
        codecs = [c for side in SIDES for c in self.codecs[side] if c is not None]
        self.token_group = max((getattr(c, "token_group", 1) for c in codecs), default=1)
        if self._use_kernels():
            self._init_packed()
        self.is_initialized = True

    def _use_kernels(self) -> bool:
        """Whether the Triton kernels serve this layer: `kernels`, the device, and codes they can read."""
        if self.kernels == "torch" or self.bank is None:
            return False
        unreadable = [
            side for side in SIDES if any(c is None or kernel_centroids(c) is None for c in self.codecs[side])
        ]
        if self.kernels == "auto":
            return self.device.type == "cuda" and not unreadable and _triton_available()
        if unreadable:
            raise RuleError(
                f"kernels='triton': layer {self.layer_idx}'s {unreadable} codes are not plain TurboQuant-MSE "
                "codes of 2–4 bits or TurboQuant-Prod codes of 3–5 bits (qjl_dim = head_dim) with head_dim a "
                "power of two >= 32 (no query metric or norm correction, both sides compressed); use "
                "kernels='auto' or 'torch'"
            )
        if not _triton_available():
            raise RuleError("kernels='triton' needs triton: `pip install triton` (CPU: TRITON_INTERPRET=1)")
        from ..kernels.decode import INTERPRETED

        if self.device.type != "cuda" and not INTERPRETED:
            raise RuleError(
                f"kernels='triton' on {self.device.type} runs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported (or kernels='auto' for the PyTorch path)"
            )
        return True

    def _init_packed(self) -> None:
        from ..kernels import centroid_table, quantize_tables

        self.packed, self.rotations, self.tables, self.quantize_tables = {}, {}, {}, {}
        # per side, set on the device by the fused quantize where a norm overflows norm_dtype (`check_norms`)
        self.norm_overflow = torch.zeros(len(SIDES), dtype=torch.int32, device=self.device)
        self.projections, self.means, self.rotated_means = {}, {}, {}
        for side in SIDES:
            codecs = [stored(c) for c in self.codecs[side]]
            first, centered = codecs[0], codecs[0] is not self.codecs[side][0]
            mse = stage1(first)
            prod = mse is not first
            if any(
                type(c) is not type(first) or c.bits != first.bits or c.norm_dtype != first.norm_dtype
                or (c is not wrapped) != centered
                for c, wrapped in zip(codecs, self.codecs[side], strict=True)
            ):  # fmt: skip
                raise RuleError(
                    f"layer {self.layer_idx}: the {side} codecs of its KV heads differ in kind, bits, norm dtype "
                    "or mean removal"
                )
            labels = sign_magnitude(first)  # the decode kernels' shorter 4-bit decode
            self.packed[side] = PackedCodes(
                mse.bits, mse.dim, first.norm_dtype, self.reserve_tokens, prod, labels
            )
            with torch.no_grad():
                # matrix() builds on the rotation's own device: CPU for one without tensors (identity)
                self.rotations[side] = torch.stack([c.rotation.matrix().to(self.device) for c in codecs])
            # Prod: each KV head's QJL projection S, [KVH, d, d]
            self.projections[side] = torch.stack([c.projection for c in codecs]) if prod else None
            # Centered: each KV head's mean μ [KVH, d]; its codes are of x − μ (the fused quantize subtracts it),
            # and the decode kernels add Πμ's terms to their scores and outputs
            means = torch.stack([c.mean for c in self.codecs[side]]) if centered else None
            self.means[side] = means
            self.rotated_means[side] = (
                None
                if means is None
                else (self.rotations[side].double() @ means.double()[..., None])[..., 0].float()
            )
            self.tables[side] = centroid_table(kernel_centroids(first), labels)
            self.quantize_tables[side] = quantize_tables(
                self.rotations[side], mse.boundaries, self.dtype, self.projections[side],
                mse.centroids if prod else None, means, labels,
            )  # fmt: skip

    def _quantize(
        self, side: str, states: torch.Tensor, at: torch.Tensor | None = None, launch: bool = True
    ) -> tuple[torch.Tensor, ...] | QuantizeLaunch:
        """All KV heads of [B, KVH, T, d] in one fused quantize (each head with its own rotation): the
        tensors of `PackedCodes.fields`, or with `at` (a token count on the device) written straight into
        the layer's storage from that token on. launch=False: the checked call, for `run_together`."""
        from ..kernels import quantize_mse, quantize_prod

        codec = stored(self.codecs[side][0])
        mse, tables, mean = stage1(codec), self.quantize_tables[side], self.means[side]
        into = None if at is None else self.packed[side].stores()
        overflow = self.norm_overflow[SIDES.index(side)]
        # the decode kernels take p·‖v‖ as an fp16 operand: a value norm past fp16's range is refused as an overflow
        limit = torch.finfo(torch.float16 if side == "value" else torch.float32).max
        if self.projections[side] is not None:
            return quantize_prod(
                states, self.rotations[side], mse.boundaries, self.projections[side], mse.centroids,
                codec.norm_dtype, tables, mean, into, at, overflow, launch, limit,
            )  # fmt: skip
        return quantize_mse(
            states, self.rotations[side], codec.boundaries, codec.norm_dtype, tables, mean, into, at, overflow,
            launch, limit,
        )  # fmt: skip

    @property
    def key_codecs(self) -> list:
        return self.codecs["key"]

    @property
    def value_codecs(self) -> list:
        return self.codecs["value"]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take the new tokens ([B, KVH, T, d]), encode what leaves the exact window, and return the new keys
        marked with this layer, so that the tqlab attention function reads what the layer holds."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shapes(key_states, value_states)
        if self.static:
            return self._update_static(key_states, value_states)
        # any other attention read only the last call's new tokens, never the codes: refuse before it goes on
        if self.awaiting_attention:
            raise RuntimeError(
                f"layer {self.layer_idx}: the tokens of the previous call were never read by tqlab's attention, so "
                "that call attended to them alone, without the cache. Run the model with "
                'attn_implementation="tqlab" (compress_kv(model, ...) sets it; keep it while the cache is in use); '
                "to fill a cache without attending, use cache.append(key_states, value_states, layer_idx)"
            )
        self.awaiting_attention = True
        if self.is_sliding and self.held > 2 * self.sliding_window:  # amortised: drops come in batches
            self._drop_oldest(self.held - (self.sliding_window - 1))
        prefill_exact = self.layout.protocol == "prefill_exact"
        if prefill_exact:  # earlier calls' tokens now go to codes; this call's attend to themselves exactly
            self.settle()
        for side, states in (("key", key_states), ("value", value_states)):
            self._pending[side] = _cat(self._pending[side], states)
        self.length += key_states.shape[-2]
        if not prefill_exact:
            self.settle()
        marked = key_states.view_as(key_states)
        setattr(marked, attention.LAYER_MARK, self)
        return marked, value_states

    def _check_shapes(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Heads beyond the layer's codecs would be dropped unstored, another batch fail deep in a concatenation."""
        k, v = tuple(key_states.shape), tuple(value_states.shape)
        if len(k) != 4 or k[:3] != v[:3] or k[1] != self.num_kv_heads:
            raise ValueError(
                f"layer {self.layer_idx}: keys {list(k)} and values {list(v)} must both be [batch, "
                f"{self.num_kv_heads} KV heads, tokens, head_dim]"
            )
        if self.batch is None:  # the first tokens since a reset set it
            self.batch = k[0]
        if k[0] != self.batch:
            raise ValueError(
                f"layer {self.layer_idx}: {k[0]} sequences after {self.batch}; the batch is fixed"
            )

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store new tokens as `update` does, with no attention to read them (filling a cache to measure it)."""
        self.update(key_states, value_states)
        self.awaiting_attention = False

    def freeze(self, capacity: int, starts: torch.Tensor | None = None) -> None:
        """Make decode steps capturable in a CUDA graph: every token but the sinks and the window encoded now,
        the code tensors sized for `capacity` tokens per sequence once, and from here on the count of codes
        kept on the device, so that a step's work (quantize, write at that count, attend over the whole
        capacity with the lengths read on the device) never depends on a host value. starts: per sequence the padding keys no query sees.
        Sink tokens and the recent window stay exact and are merged into every step, as on the eager path:
        the window is a buffer of its last `recent_window` tokens in order, shifted in place each step, the
        token leaving it coded at the device-side count (under prefill_exact the step's own token joins the
        window at the next step, as the eager path settles it then).
        The Python-side count follows each eager step; after a graph's replays its owner sets it (`set_length`)."""
        why = self.why_not_freezable(capacity)
        if why is not None:
            raise RuleError(f"layer {self.layer_idx} cannot decode in a CUDA graph: {why}")
        held = self.packed["key"].indices if self.packed["key"].length else self._pending["key"]
        batch = held.shape[0]
        if starts is not None and tuple(starts.shape) != (batch,):
            raise ValueError(f"starts has shape {tuple(starts.shape)}; expected ({batch},): one per sequence")
        self.settle()  # the sinks filled, the window holding its last tokens, every other token coded
        sinks, window = self._sunk_held("key"), self.layout.recent_window
        own = int(self.layout.protocol == "prefill_exact")
        for side in SIDES:
            assert self._pending[side].shape[-2] == window, "settled: the window holds its last tokens"
            if not window:
                self._pending[side] = None
            self.packed[side].grow_to(capacity - sinks)
            # prefill_exact: the previous step's token, which joins the window at this step
            self._last[side] = torch.zeros_like(self._pending[side][..., :1, :]) if window and own else None
        self._has_last = torch.zeros((), dtype=torch.bool, device=self.device) if window and own else None
        # The codes held (where a step's are written) and those a step attends to, per sequence (without a
        # window, under prefill_exact the step's own token is coded already and attended exactly instead): one
        # int32 tensor, so that a step counts its codes in one launch
        held = self.packed["key"].length
        counts = [held] + [held - (0 if window else own)] * batch
        self._counts = torch.tensor(counts, dtype=torch.int32, device=self.device)
        self._codes_held, self._read_lengths = self._counts[0], self._counts[1:]
        starts = (torch.zeros(batch) if starts is None else starts).to(device=self.device, dtype=torch.int32)
        self._starts = starts
        code_starts = (starts - sinks).clamp_min(0)  # the padding among the codes
        self._code_starts = code_starts if bool(code_starts.any()) else None  # None: the kernel reads none
        # which sinks each query sees (those not in the padding); the window's are found per step
        self._sinks_seen = (torch.arange(sinks, device=self.device) >= starts[:, None])[:, None]  # [B, 1, S]
        self._frozen_at = self.length
        self.capacity, self.static = capacity, True

    def why_not_freezable(self, capacity: int) -> str | None:
        """Why this layer cannot be frozen for `capacity` tokens per sequence, or None."""
        if not self.is_initialized:
            return "it has not seen the prompt"
        if self.static:
            return "it is frozen already (cache.thaw() first)"
        if self.packed is None:
            return "its codes are not the Triton kernels' (kernels='torch', an exact layer, or codes they cannot read)"
        if self.is_sliding:
            return "it is a sliding-window layer (it drops its oldest tokens)"
        if capacity < self.length:
            return f"capacity={capacity} is less than the {self.length} tokens it holds"
        exact = self.layout.sink_tokens + self.layout.recent_window
        if exact and self.length <= exact:
            return (
                f"its {self.length} tokens leave nothing to code beyond its {self.layout.sink_tokens} sink "
                f"tokens and {self.layout.recent_window}-token window"
            )
        return None

    def thaw(self) -> None:
        """Back to the eager path (a padded batch needs its attention mask again): what it holds stays, the
        last step's token (prefill_exact with a window) back among the exact tokens."""
        self._flush_start()
        if self._last["key"] is not None and self.length > self._frozen_at:
            for side in SIDES:
                self._pending[side] = torch.cat([self._pending[side], self._last[side]], dim=-2)
        self._last = {side: None for side in SIDES}
        self.static = False

    def set_length(self, tokens: int) -> None:
        """A frozen layer's Python-side count of tokens per sequence (all coded but the sinks, the window and,
        after a step under prefill_exact with a window, that step's token)."""
        self.length = tokens
        last = int(self._last["key"] is not None and tokens > self._frozen_at)
        for side, packed in self.packed.items():
            packed.length = tokens - self._sunk_held(side) - self.layout.recent_window - last

    def _update_static(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A frozen layer's step: one token coded at the device-side count — the new one, or with a recent
        window the one leaving it — (prefill_exact keeps the step's own states too: its queries see them
        exactly, not their codes). Without a window the quantize is only prepared here: the step's tqlab
        attention launches it with its queries' rotation (`_start_step`), so a frozen layer's update must be
        followed by its attention (a leftover is flushed at the next update or thaw, and refused inside a
        CUDA-graph capture)."""
        tokens = key_states.shape[-2]
        if tokens != 1 or self.length + 1 > self.capacity:
            raise RuleError(
                f"layer {self.layer_idx} is frozen for one token per step and {self.capacity} tokens per sequence; "
                f"got {tokens} new tokens with {self.length} held (cache.thaw() returns it to the eager path)"
            )
        from ..kernels.quantize import run_together

        self._flush_start()
        window, last = self.layout.recent_window, self._last["key"] is not None
        # Coded, keys and values in one launch where their codecs allow: the new token, or the window's oldest,
        # which the new token (or under prefill_exact the previous step's, once there is one) replaces; written
        # at the count, past it if it stays. Without a window, the step's attention launches them together with
        # its queries' rotation (`_start_step`) and counts them then.
        new = {"key": key_states, "value": value_states}
        calls = [
            self._quantize(
                side, self._pending[side][..., :1, :] if window else new[side], self._codes_held, False
            )
            for side in SIDES
        ]
        if not window:
            self._starting, self._starting_captured = calls, _capturing()
        else:
            run_together(*calls)
            for side, states in new.items():
                shifted = torch.cat(
                    [self._pending[side][..., 1:, :], self._last[side] if last else states], -2
                )
                self._pending[side].copy_(
                    torch.where(self._has_last, shifted, self._pending[side]) if last else shifted
                )
                if last:
                    self._last[side].copy_(states)
            self._count_coded(self._has_last if last else 1)
            if last:
                self._has_last.fill_(True)
        self.set_length(self.length + tokens)
        exact = self.layout.protocol == "prefill_exact"
        self._step_states = (key_states, value_states) if exact else None
        marked = key_states.view_as(key_states)
        setattr(marked, attention.LAYER_MARK, self)
        return marked, value_states

    def _start_step(self, query: torch.Tensor) -> torch.Tensor:
        """A frozen step's queries [B, Hq, 1, d] rotated into the key domain (fp32), in one launch with the
        key and value quantize `_update_static` left, which are then counted."""
        from ..kernels.quantize import run_together
        from ..kernels.step import rotate_queries

        if self._starting is None:
            return rotate_queries(query, self.rotations["key"])
        _, rotated = run_together(*self._starting, query=query, rotations=self.rotations["key"])
        self._starting = None  # launched: a ValueError above leaves it to the next flush
        self._count_coded(1)
        return rotated

    def _flush_start(self) -> None:
        """The quantize a step's attention did not launch (it never ran), launched and counted now."""
        from ..kernels.quantize import run_together

        if self._starting is None:
            return
        if _capturing():
            raise RuntimeError(
                f"layer {self.layer_idx}: a frozen step's update was not followed by its tqlab attention before "
                "this capture; its codes would be written again at every replay"
            )
        run_together(*self._starting)
        self._starting = None
        self._count_coded(1)

    def _settle_start(self) -> None:
        """At the owner's `set_length`: a leftover quantize recorded by a capture never ran (dropped); one left
        by an eager step is coded now."""
        if self._starting_captured:
            self._starting = None
        self._flush_start()

    def _count_coded(self, coded) -> None:
        """Tokens coded by a frozen step (1, or a device tensor), added to the device-side counts."""
        self._counts.add_(coded)

    def settle(self) -> None:
        """Move exact tokens beyond the recent window to the sinks (while there are fewer than
        `sink_tokens`), then to codes in whole token groups; each token is encoded once."""
        for side in SIDES:
            pending, codecs = self._pending[side], self.codecs[side]
            if codecs[0] is None or pending is None:
                continue
            leaving = pending.shape[-2] - self.layout.recent_window
            to_sink = min(max(self.layout.sink_tokens - self._sunk[side], 0), max(leaving, 0))
            if to_sink:
                self._sink[side] = _cat(self._sink[side], pending[..., :to_sink, :].clone())
                self._sunk[side] += to_sink
            encoded = max(leaving - to_sink, 0) // self.token_group * self.token_group
            if encoded:
                chunk = pending[..., to_sink : to_sink + encoded, :]
                if self.packed is not None:
                    self._encode_packed(side, chunk)
                else:
                    # codecs that gate by position (relevance_gated) learn where the chunk starts: every token
                    # sunk or coded before it, dropped ones included
                    start = self.offset + self._sunk_held(side) + self.coded_tokens(side)
                    positional = {"start": start} if getattr(codecs[0], "positional", False) else {}
                    for h, codec in enumerate(codecs):
                        code = codec.quantize(chunk[:, h], **positional)
                        self._codes[side][h] = concat(self._codes[side][h], code)
            if to_sink or encoded:  # a copy: a view would keep the whole old buffer alive
                self._pending[side] = pending[..., to_sink + encoded :, :].clone()

    def _encode_packed(self, side: str, chunk: torch.Tensor) -> None:
        fields = self._quantize(side, chunk)
        # The fused quantize stores an overflowing norm as inf, where the codec raises; chunks of several tokens
        # (a prompt, a group leaving the recent window) are checked here, before they join the codes; one decode
        # token is not, as reading the flag back would stall the stream at every step (`check_norms`).
        if chunk.shape[-2] > 1:
            self.check_norms()
        self.packed[side].append(*fields)

    def check_norms(self) -> None:
        """Raise if the fused quantize stored a norm of this layer that overflows norm_dtype (as inf, which
        makes the attention over it NaN), in any call since the last reset. Reads a flag back: a sync."""
        if self.packed is None or not bool(self.norm_overflow.any()):
            return
        side = next(side for side, bad in zip(SIDES, self.norm_overflow.tolist(), strict=True) if bad)
        dtype = self.packed[side].norm_dtype
        if side == "value":  # whatever norm_dtype holds, the decode kernels weight values as fp16 operands
            raise ValueError(
                f"layer {self.layer_idx}: a value vector's norm is past fp16's 65 504 (or the vector is not finite): "
                "the GPU decode kernels take p·‖v‖ as an fp16 operand whatever norm_dtype stores, so attention "
                "over these codes would be inf or NaN; use kernels='torch' (the PyTorch path, in fp32) for this model"
                + (
                    ", with codec.norm_dtype=float32 or bfloat16 (fp16 cannot store such a norm)"
                    if dtype == torch.float16
                    else ""
                )
            )
        advice = (  # the kernel sums squares in float32: beyond ~1e19 per entry a float32 norm overflows too
            "use codec.norm_dtype=float32 or bfloat16"
            if dtype == torch.float16
            else "its entries are beyond ~1e19 or not finite (the kernel sums their squares in float32)"
        )
        raise ValueError(
            f"layer {self.layer_idx}: a {side} vector's norm overflows norm_dtype={dtype} (or the vector is not "
            f"finite) in the fused quantize, so attention over these codes is NaN; {advice}"
        )

    def _sunk_held(self, side: str) -> int:
        return 0 if self._sink[side] is None else self._sink[side].shape[-2]

    def coded_tokens(self, side: str) -> int:
        if self.packed is not None:
            return self.packed[side].length
        code = self._codes[side][0]
        return 0 if code is None else code.shape[1]

    def exact_tokens(self, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The exact sinks and the exact tokens after the codes, [B, KVH, n, d] each (or None)."""
        return self._sink[side], self._pending[side]

    def _drop_oldest(self, n: int) -> None:
        """Forget up to n of the oldest tokens a sliding layer holds (its mask hides them already): sinks,
        then codes (whole token groups), then exact tokens, in token order, and the same number per side."""
        coded = next((side for side in SIDES if self.codecs[side][0] is not None), None)
        if coded is not None:  # codes go a whole token group at a time, and what follows them after them
            sinks = 0 if self._sink[coded] is None else self._sink[coded].shape[-2]
            codes = self.coded_tokens(coded)
            from_codes = min(max(n - sinks, 0), codes)
            if from_codes < codes:
                n = min(n, sinks) + from_codes - from_codes % self.token_group
        for side in SIDES:
            left = n
            if self._sink[side] is not None and left:
                take = min(left, self._sink[side].shape[-2])
                self._sink[side], left = self._sink[side][..., take:, :].clone(), left - take
            if self.coded_tokens(side) and left:
                take = min(left, self.coded_tokens(side))
                if self.packed is not None:
                    self.packed[side].drop_front(take)
                else:
                    self._codes[side] = [drop_front(c, take) for c in self._codes[side]]
                left -= take
            if self._pending[side] is not None and left:
                self._pending[side] = self._pending[side][..., left:, :].clone()
        self.offset += n

    @property
    def held(self) -> int:
        """Tokens the layer holds: every one it has seen, less those a sliding layer has dropped."""
        return self.length - self.offset

    def segments(self, side: str, head: int) -> list[tuple]:
        """What one KV head holds of a side, in token order: (codec, code, None) for codes and
        (None, None, exact states [B, T, d]) for exact tokens."""
        codec = self.codecs[side][head]
        code = self.packed[side].head(head) if self.packed is not None else self._codes[side][head]
        parts = [] if self._sink[side] is None else [(None, None, self._sink[side][:, head])]
        if code is not None:
            parts.append((codec, code, None))
        if self._pending[side] is not None and self._pending[side].shape[-2]:
            parts.append((None, None, self._pending[side][:, head]))
        return parts

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # a sliding layer holds between window − 1 and 2 × window tokens; its mask hides the older ones
        return self.held + query_length, self.offset

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = self.offset = 0
        self.batch = None  # sequences per call, fixed by the first tokens
        self.awaiting_attention = False  # an eager update's tokens, until tqlab's attention reads them
        self.static, self.capacity = False, None  # frozen for CUDA-graph decode steps (`freeze`)
        self._counts = self._codes_held = self._read_lengths = None
        self._starts = self._code_starts = self._sinks_seen = None
        self._step_states = self._starting = None
        self._starting_captured = False
        self._has_last, self._frozen_at = None, 0
        self._last: dict[str, torch.Tensor | None] = {side: None for side in SIDES}
        self._sunk = {side: 0 for side in SIDES}
        self._sink: dict[str, torch.Tensor | None] = {side: None for side in SIDES}
        self._codes = {side: [None] * self.num_kv_heads for side in SIDES}
        self._pending: dict[str, torch.Tensor | None] = {side: None for side in SIDES}
        if self.packed is not None:
            self.packed = {side: p.emptied() for side, p in self.packed.items()}
            self.norm_overflow.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("beam search is not supported over compressed codes; use greedy or sampling")

    # The rest of transformers' layer API that this cache does not model: refused by name, not an AttributeError
    # (or, for offload, a dereference of the absent `keys`) from deep inside transformers.
    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("crop (assisted decoding, rewinding) is not supported over compressed codes")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError(
            "batch_repeat_interleave (contrastive search) is not supported over compressed codes"
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("batch_select_indices (contrastive search) is not supported over compressed codes")

    def offload(self) -> None:
        raise ValueError("offloading is not supported over compressed codes (they are 4-5x smaller already)")

    def prefetch(self) -> None:
        self.offload()

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of every stored tensor: codes (payload, norms, side information) and exact tokens; with
        `allocated`, the code tensors the kernels read counted whole (filled or reserved rows alike)."""
        codes = sum(c.nbytes for side in self._codes.values() for c in side if c is not None)
        codes += sum(p.allocated_nbytes() if allocated else p.nbytes() for p in (self.packed or {}).values())
        exact = [t for part in (self._sink, self._pending) for t in part.values() if t is not None]
        if self._last["key"] is not None and allocated:  # a frozen prefill_exact layer's last-token buffer
            exact += list(self._last.values())
        elif self._last["key"] is not None and self.length > self._frozen_at:
            # its last token, counted coded, as the next step codes one (`TurboQuantCache.nbytes` settles
            # an eager prefill_exact layer the same way)
            codes += sum(p.nbytes() // p.length for p in self.packed.values())
        return codes + sum(t.numel() * t.element_size() for t in exact)


class TurboQuantCache(Cache):
    """A Cache whose attention layers are TurboQuantLayers; layers in `exact_layers` keep every token exact,
    and layers of kinds this cache does not compress are transformers' own, in the model's dtype."""

    def __init__(self, layers: list, bank: CodecBank | None, text_config=None):
        super().__init__(layers=layers)
        self.bank = bank  # None: compression off, every layer is transformers' own
        self.text_config = text_config  # the model's: its attention must be tqlab's (None: not checked)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """A model's call: refused, before anything is stored, where the model's attention is not tqlab's, which
        alone reads the codes (any other would attend to each call's new tokens only)."""
        implementation = getattr(self.text_config, "_attn_implementation", attention.NAME)
        if implementation != attention.NAME and isinstance(self.layers[layer_idx], TurboQuantLayer):
            raise RuntimeError(
                f'the model runs attn_implementation="{implementation}", which would attend to each call\'s new '
                'tokens only, never to this cache; compress_kv(model, ...) sets "tqlab" (keep it while the cache '
                "is in use), and cache.append(key_states, value_states, layer_idx) fills a cache with no model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def from_spec(
        cls,
        config,
        spec: KVQuantSpec | None,
        calibration=None,
        kernels: str = "auto",
        reserve_tokens: int | None = None,
        **layout,
    ) -> TurboQuantCache:
        """layout: the fields of `CacheLayout` (protocol, exact_layers, sink_tokens, recent_window).
        kernels: "auto" (Triton on CUDA where the codes allow), "triton" (always; an error where the codes do
        not allow; on CPU it needs TRITON_INTERPRET=1) or "torch" (the PyTorch reference path).
        reserve_tokens: tokens per sequence to allocate the kernels' code tensors for at once (the longest
        prompt + generation expected), so that they never grow (by half, copying) within it; None: grow."""
        if kernels not in KERNELS:
            raise RuleError(f"kernels={kernels!r} is not allowed; choose from {list(KERNELS)}")
        if reserve_tokens is not None:
            try:
                if isinstance(reserve_tokens, bool) or operator.index(reserve_tokens) < 1:
                    raise TypeError
            except TypeError:
                raise RuleError(
                    f"reserve_tokens={reserve_tokens!r} must be a positive number of tokens, or None"
                ) from None
            reserve_tokens = operator.index(reserve_tokens)
        layout = CacheLayout(**layout)
        text = config.get_text_config(decoder=True)
        arch = architecture_facts(text)
        head_dim, num_kv_heads = arch["head_dim"], arch["num_kv_heads"]
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        n = len(layer_types)
        outside = [i for i in layout.exact_layers if not -n <= i < n]
        if outside:
            raise RuleError(
                f"exact_layers={list(layout.exact_layers)}: {outside} are not layers of this {n}-layer model"
            )
        kinds = list(zip(layer_types, layer_kwargs, strict=True))
        if spec is None:  # compression off: transformers' own layers, and the attention is exactly SDPA
            return cls([DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs) for kind, kwargs in kinds], None)
        bank = CodecBank(spec, head_dim, calibration)
        exact = {i % n for i in layout.exact_layers}
        compressed = [i for i, (kind, _) in enumerate(kinds) if kind in ATTENTION_LAYERS and i not in exact]
        bank.check_units(compressed, num_kv_heads)  # fitted rotations for every compressed (layer, head)
        layers = []
        for i, (kind, kwargs) in enumerate(kinds):
            if kind in ATTENTION_LAYERS:
                layer_bank = None if i in exact else bank
                layers.append(
                    TurboQuantLayer(
                        layer_bank,
                        i,
                        num_kv_heads,
                        layout,
                        kwargs.get("sliding_window"),
                        kernels,
                        reserve_tokens,
                    )
                )
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        return cls(layers, bank, text)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Store new tokens of one layer with no model attending over them (filling a cache to measure it);
        a model's forward calls `update`, whose tokens tqlab's attention must then read."""
        layer = self.layers[layer_idx]
        if isinstance(layer, TurboQuantLayer):
            layer.append(key_states, value_states)
        else:
            layer.update(key_states, value_states)

    def check_norms(self) -> None:
        """Raise, naming the layer, if the fused quantize stored a norm that overflows its norm_dtype since the
        last reset. Prompts and groups of tokens are checked as they are coded; a single decode token is checked
        only here, since reading the flags back is a sync: `GraphDecoder` calls this after its steps; after
        `model.generate` (or a loop of forward calls) call it yourself."""
        by_device = {}  # one read per device (a model split over GPUs has flags on each)
        for layer in self.layers:
            if getattr(layer, "packed", None) is not None:
                by_device.setdefault(layer.norm_overflow.device, []).append(layer)
        for layers in by_device.values():
            if bool(torch.stack([layer.norm_overflow for layer in layers]).any()):
                for layer in layers:
                    layer.check_norms()

    def freeze(self, capacity: int, starts: torch.Tensor | None = None) -> None:
        """Make the decode steps capturable in a CUDA graph (`TurboQuantLayer.freeze`), for sequences of up to
        `capacity` tokens; starts: per sequence the left-padding tokens (default none). Refused, naming the
        layer, for a sliding-window layer, codes that are not the kernels', or a prompt that does not reach
        past the sink tokens and the recent window."""
        why = {
            i: layer.why_not_freezable(capacity)
            if isinstance(layer, TurboQuantLayer)
            else "not a TurboQuantLayer"
            for i, layer in enumerate(self.layers)
        }  # every layer checked before any is changed
        refused = {i: reason for i, reason in why.items() if reason is not None}
        from ..kernels.decode import MAX_ROWS

        heads = self.text_config.num_attention_heads
        group = heads // (getattr(self.text_config, "num_key_value_heads", None) or heads)
        if group > MAX_ROWS:  # the eager path takes the reference then; a frozen step has only the kernel
            raise RuleError(
                f"this cache cannot decode in a CUDA graph: {group} query heads per KV head exceed the decode "
                f"kernel's {MAX_ROWS} rows per step"
            )
        if refused:
            i, reason = next(iter(refused.items()))
            raise RuleError(
                f"this cache cannot decode in a CUDA graph: layer {i}: {reason} "
                f"({len(refused)} of {len(self.layers)} layers refused)"
            )
        for layer in self.layers:  # the first refuses a wrong `starts` before any layer changes
            layer.freeze(capacity, starts)

    @property
    def frozen(self) -> bool:
        return all(isinstance(layer, TurboQuantLayer) and layer.static for layer in self.layers)

    def thaw(self) -> None:
        """Back to the eager path (a padded batch needs its attention mask again)."""
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                layer.thaw()

    def set_length(self, tokens: int) -> None:
        """A frozen cache's Python-side count of tokens per sequence, after a CUDA graph's replays wrote them (a
        step's quantize left by a capture that stopped before its attention is dropped: it never ran; one left
        by an eager step is coded now)."""
        for layer in self.layers:
            layer._settle_start()
            layer.set_length(tokens)

    def nbytes(self) -> dict:
        """Real bytes: what is stored per token (codes and exact tokens), the per-layer constants apart, and
        what is allocated for the tokens (stored, plus the kernels' code rows grown or reserved ahead).
        Tokens a prefill_exact layer holds exact until the next call are encoded first, as that call would."""
        stored = allocated = 0
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                if layer.is_initialized:
                    layer.settle()
                stored += layer.nbytes()
                allocated += layer.nbytes(allocated=True)
            elif getattr(layer, "keys", None) is not None:
                exact = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
                stored, allocated = stored + exact, allocated + exact
        units = [
            (layer.layer_idx, h)
            for layer in self.layers
            if isinstance(layer, TurboQuantLayer) and layer.is_initialized and layer.bank is not None
            for h in range(layer.num_kv_heads)
        ]
        device = next(
            (layer.device for layer in self.layers if getattr(layer, "is_initialized", False)), "cpu"
        )
        constants = self.bank.constant_nbytes(units, device) if units else 0
        return {"stored": stored, "constants": constants, "allocated": allocated}


def compress_kv(
    model,
    spec: KVQuantSpec | None,
    calibration=None,
    kernels: str = "auto",
    reserve_tokens: int | None = None,
    **layout,
) -> TurboQuantCache:
    """Switch `model` to attention that reads codes and return a fresh TurboQuantCache for it: pass it as
    `model.generate(..., cache=cache)` or `model(..., cache=cache)`. One cache per sequence batch; spec=None
    gives the uncompressed cache under the same attention function (exactly SDPA). kernels, reserve_tokens:
    see `TurboQuantCache.from_spec`. layout: the fields of `CacheLayout`, e.g. `protocol="prefill_exact",
    exact_layers=(0,), sink_tokens=4, recent_window=64`."""
    cache = TurboQuantCache.from_spec(model.config, spec, calibration, kernels, reserve_tokens, **layout)
    attention.register()  # after every argument was checked: a refused call leaves the model as it was
    model.set_attn_implementation(attention.NAME)
    return cache
