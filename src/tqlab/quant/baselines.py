"""Baselines in the codec interface, so comparisons are at equal real bytes.

- Int8Block: llama.cpp q8_0 — blocks of 32 along the vector, int8 values, one fp16 scale (8.5 bits).
- Int4Block: llama.cpp q4_0 — blocks of 32, 4-bit values packed two per byte, one fp16 scale (4.5 bits);
  optionally behind a fast Hadamard rotation (the "q4_0 + Hadamard" baseline of llama.cpp / vLLM).
- KIVI: asymmetric b-bit quantization with an fp16 scale and zero point per group of 32; keys per
  channel (groups of 32 tokens along axis −2), values per token (groups of 32 channels).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..rotation import Rotation
from .codes import Code, buffer_nbytes, check_input, check_underflow
from .mse import build_rotation
from .packing import pack_bits, unpack_bits

_SCALE_DTYPE = torch.float16


def _stored(values: torch.Tensor, codec: str, scale: bool = True) -> torch.Tensor:
    """Scales and zero points as stored (fp16); refused when a block's value overflows fp16, which would
    decode to NaN or Inf, or (`scale`: a symmetric code's scale, which every value of the block is a multiple
    of) when fp16 keeps too few bits of it. An asymmetric code's scale only spans its block's range above the
    zero point: a tiny one costs at most that range."""
    stored = values.to(_SCALE_DTYPE)
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"{codec}: a block's scale or zero point ({values.abs().max().item():.3g}) overflows its fp16 storage "
            f"(largest {torch.finfo(_SCALE_DTYPE).max:.0f}); inputs this large cannot be stored in this format"
        )
    if scale:
        check_underflow(
            values, stored, "a block's scale", codec, "inputs this small cannot be stored in this format"
        )
    return stored


@dataclasses.dataclass
class BlockCode(Code):
    bits: int
    values: torch.Tensor  # packed codes (uint8) or int8 values, grouped along the quantized axis
    scales: torch.Tensor  # fp16, one per group
    zeros: torch.Tensor | None = None  # fp16 group minimum (asymmetric codes only)


@dataclasses.dataclass
class ChannelGroupCode(BlockCode):
    """KIVI's keys: each channel quantized over groups of `group` tokens, so tokens lie along the last axis
    of values/scales/zeros ([*batch, dim, ...]), not along the leading shape."""

    group: int = 32
    grouped_token_fields: ClassVar[tuple[str, ...]] = ("values", "scales", "zeros")


def _check_block(group: int, what: str) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"{what}: the block size {group!r} must be a positive integer")


def _check_groups(n: int, group: int, what: str) -> None:
    _check_block(group, what)
    if n % group:
        raise ValueError(f"{what}: dim={n} is not divisible by the block size {group}")


class _Baseline(nn.Module):
    def score(self, queries: torch.Tensor, code: BlockCode) -> torch.Tensor:
        """⟨q, x̂⟩ by dequantizing the keys: what a dequantize-then-attend cache computes."""
        q = check_input(queries, self.dim, self._device(), f"{type(self).__name__}.score")
        return q @ self.dequantize(code).transpose(-1, -2)

    def constant_nbytes(self) -> int:
        return buffer_nbytes(self)

    def _device(self) -> torch.device:
        return self.device_marker.device


class Int8Block(_Baseline):
    def __init__(self, dim: int, block: int = 32):
        super().__init__()
        _check_groups(dim, block, "Int8Block")
        self.dim, self.block, self.bits = dim, block, 8
        self.register_buffer("device_marker", torch.zeros(0))

    def quantize(self, x: torch.Tensor) -> BlockCode:
        x = check_input(x, self.dim, self._device(), "Int8Block")
        g = x.reshape(*x.shape[:-1], self.dim // self.block, self.block)
        scales = _stored(g.abs().amax(-1) / 127, "int8_block")
        s = scales.float().unsqueeze(-1)
        q = torch.where(s > 0, g / s, torch.zeros_like(g)).round().clamp(-127, 127).to(torch.int8)
        return BlockCode(tuple(x.shape[:-1]), self.dim, 8, q.flatten(-2), scales)

    def dequantize(self, code: BlockCode) -> torch.Tensor:
        g = code.values.float().reshape(*code.shape, self.dim // self.block, self.block)
        return (g * code.scales.float().unsqueeze(-1)).flatten(-2)


class Int4Block(_Baseline):
    """q4_0: d = (signed value of largest magnitude) / −8, q = clamp(round(x/d) + 8, 0, 15), x̂ = (q − 8)·d."""

    def __init__(self, dim: int, block: int = 32, rotation: str | Rotation = "identity", seed: int = 0):
        super().__init__()
        _check_groups(dim, block, "Int4Block")
        self.dim, self.block, self.bits = dim, block, 4
        self.rotation = build_rotation(rotation, dim, seed, {})
        self.register_buffer("device_marker", torch.zeros(0))

    def quantize(self, x: torch.Tensor) -> BlockCode:
        x = self.rotation.apply(check_input(x, self.dim, self._device(), "Int4Block"))
        g = x.reshape(*x.shape[:-1], self.dim // self.block, self.block)
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scales = _stored(extreme / -8, "int4_block")
        s = scales.float().unsqueeze(-1)
        q = torch.where(s != 0, g / s, torch.zeros_like(g))
        q = torch.floor(q + 8.5).clamp(0, 15)  # llama.cpp rounds half up
        return BlockCode(tuple(x.shape[:-1]), self.dim, 4, pack_bits(q.flatten(-2).long(), 4), scales)

    def dequantize(self, code: BlockCode) -> torch.Tensor:
        q = (
            unpack_bits(code.values, 4, self.dim)
            .float()
            .reshape(*code.shape, self.dim // self.block, self.block)
        )
        return self.rotation.inverse(((q - 8) * code.scales.float().unsqueeze(-1)).flatten(-2))


class KIVI(_Baseline):
    """Asymmetric min/max quantization per group. axis="token": groups of `group` channels within each
    vector (KIVI's values). axis="channel": each channel over groups of `group` tokens along axis −2
    (KIVI's keys); the token axis is padded to a whole group by repeating the last token, and the
    padding is stored and counted. KIVI's full-precision window of recent tokens belongs to a cache."""

    def __init__(self, dim: int, bits: int = 2, axis: str = "token", group: int = 32):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 4):
            raise ValueError(f"bits={bits!r} is not allowed for KIVI: choose 2 or 4 (an integer)")
        if axis not in ("token", "channel"):
            raise ValueError(f"axis={axis!r} is not one of ('token', 'channel')")
        if axis == "token":  # groups of channels within a vector: they must tile it
            _check_groups(dim, group, "KIVI(axis='token')")
        else:  # groups of tokens: any size (the last group is padded)
            _check_block(group, "KIVI(axis='channel')")
        self.dim, self.bits, self.axis, self.group = dim, bits, axis, group
        self.token_group = group if axis == "channel" else 1  # a cache appends keys a whole group at a time
        self.register_buffer("device_marker", torch.zeros(0))

    def quantize(self, x: torch.Tensor) -> BlockCode:
        x = check_input(x, self.dim, self._device(), "KIVI")
        shape = tuple(x.shape[:-1])
        if self.axis == "channel":
            if x.ndim < 2:
                raise ValueError("KIVI(axis='channel') quantizes along tokens: pass [..., tokens, dim]")
            if x.shape[-2] == 0:
                raise ValueError("KIVI(axis='channel') codes groups of tokens: pass at least one token")
            x = x.transpose(-1, -2)
            pad = -x.shape[-1] % self.group
            if pad:
                x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
        g = x.reshape(*x.shape[:-1], x.shape[-1] // self.group, self.group)
        lo = _stored(g.amin(-1), "kivi", scale=False)
        scales = _stored((g.amax(-1) - lo.float()) / (2**self.bits - 1), "kivi", scale=False)
        s = scales.float().unsqueeze(-1)
        q = torch.where(s > 0, (g - lo.float().unsqueeze(-1)) / s, torch.zeros_like(g))
        q = q.round().clamp(0, 2**self.bits - 1).long().flatten(-2)
        if self.axis == "channel":
            return ChannelGroupCode(
                shape, self.dim, self.bits, pack_bits(q, self.bits), scales, lo, self.group
            )
        return BlockCode(shape, self.dim, self.bits, pack_bits(q, self.bits), scales, lo)

    def dequantize(self, code: BlockCode) -> torch.Tensor:
        n = code.scales.shape[-1] * self.group  # the packed bytes may hold padding up to 8 values
        q = unpack_bits(code.values, self.bits, n).float()
        g = q.reshape(*q.shape[:-1], n // self.group, self.group)
        x = (g * code.scales.float().unsqueeze(-1) + code.zeros.float().unsqueeze(-1)).flatten(-2)
        if self.axis == "channel":
            x = x[..., : code.shape[-1]].transpose(-1, -2)
        return x
