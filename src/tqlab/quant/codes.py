"""What a codec stores: every tensor of a code counts towards its bytes, nothing else does."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch


@dataclasses.dataclass
class Code:
    """Base of all codes. `shape` is the leading shape of the encoded vectors, `dim` their length.

    `nbytes` sums the bytes of every tensor the code holds (payload, norms, scales, per-vector side
    information); per-layer constants (codebooks, rotations, projection matrices, channel sets) live
    in the codec and are reported by its `constant_nbytes()`.
    """

    shape: tuple[int, ...]
    dim: int
    # fields whose tokens lie along their last axis, in whole groups (KIVI's keys), not along `shape`
    grouped_token_fields: ClassVar[tuple[str, ...]] = ()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
            elif isinstance(value, Code):
                out.update({f"{f.name}.{k}": v for k, v in value.tensors().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def num_vectors(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_coordinate(self) -> float:
        """Effective bits per coordinate: 8 · stored bytes / (vectors · dim)."""
        if self.num_vectors == 0:
            raise ValueError(
                f"{type(self).__name__} holds no vectors (shape {self.shape}): no bits per coordinate"
            )
        return 8 * self.nbytes / (self.num_vectors * self.dim)


NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_norm_dtype(dtype, codec: str) -> torch.dtype:
    """A norm storage dtype the codecs and kernels take (an int would truncate norms, fp64 doubles their bytes)."""
    if dtype not in NORM_DTYPES:
        raise ValueError(
            f"{codec}: norm_dtype={dtype!r} is not allowed; choose from {', '.join(map(str, NORM_DTYPES))}"
        )
    return dtype


def check_code(code: Code, dim: int, bits: int, codec: str) -> None:
    """A code decodes only with a codec of its own dim and bits (their packed bytes can coincide)."""
    if code.dim != dim or getattr(code, "bits", bits) != bits:
        raise ValueError(
            f"{codec} (dim={dim}, bits={bits}) cannot decode a code of dim={code.dim}, "
            f"bits={getattr(code, 'bits', None)}: use the codec that made it"
        )


def check_input(
    x: torch.Tensor, dim: int, device: torch.device, codec: str, finite: bool = True
) -> torch.Tensor:
    """Validate a batch of vectors and return it as float32 (all codec arithmetic is fp32 or wider). finite=False
    leaves the scan for NaN and Inf to a caller that finds them in its norms."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{codec} expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"{codec} was built for dim={dim}; got a tensor of shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(
            f"{codec}: input is on {x.device} but the codec's tensors are on {device}; use codec.to(device)"
        )
    if not (x.is_floating_point()):
        raise ValueError(f"{codec} expects a floating-point tensor, got {x.dtype}")
    x = x.float()
    # min/max propagate NaN
    if finite and x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():
        raise ValueError(f"{codec}: input contains NaN or Inf")
    return x


# Elements per thread of a block of rows that a CPU quantize runs at a time (512 rows at d = 256 on one
# thread): each of its dozen full-size temporaries then stays in a core's L2 (512 KiB of fp32), where over
# 16 384 rows each pass streams from memory, and fast Hadamard's passes beat its dense product there
# (`rotation.hadamard.PASSES_ELEMENTS`; docs/benchmarks.md, "The CPU target").
CPU_BLOCK_ELEMENTS = 1 << 17


def in_row_blocks(quantize_rows, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """`quantize_rows` (tensors with x's leading shape from x [..., dim]) over x, on a CPU in blocks of
    CPU_BLOCK_ELEMENTS elements per thread. Rows are coded independently, so the blocks change no code (up to a
    product's summation order at a boundary tie)."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[-1] != dim or x.device.type != "cpu":
        return tuple(quantize_rows(x))  # its own checks name what is wrong with x
    rows = x.reshape(-1, dim)
    block = max(1, CPU_BLOCK_ELEMENTS * torch.get_num_threads() // dim)
    if rows.shape[0] <= block:
        return tuple(quantize_rows(x))
    blocks = [quantize_rows(rows[i : i + block]) for i in range(0, rows.shape[0], block)]
    return tuple(
        torch.cat(column).reshape(*x.shape[:-1], *column[0].shape[1:]) for column in zip(*blocks, strict=True)
    )


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Norms of float32 rows x [..., dim] as [..., 1] float32. Squares overflow above ~1e19 per coordinate and
    underflow below ~1e-19, so such a row's float32 norm comes out inf or 0 though it is a float32 number:
    those rows are taken in float64 (as the native encode takes every row)."""
    norms = x.norm(dim=-1, keepdim=True)
    lost = (norms == 0) | norms.isinf()
    if lost.any():
        rows = lost.squeeze(-1)
        norms[rows] = x[rows].double().norm(dim=-1, keepdim=True).float()
    return norms


def store_norms(norms: torch.Tensor, dtype: torch.dtype, codec: str) -> torch.Tensor:
    stored = norms.to(dtype)
    if not torch.isfinite(stored).all():
        advice = (
            "use norm_dtype=torch.float32 or torch.bfloat16"
            if dtype == torch.float16
            else "scale the vectors down: a norm must be a finite float32"
        )
        raise ValueError(
            f"{codec}: a vector norm ({norms.max().item():.4g}) overflows norm_dtype={dtype}; {advice}"
        )
    advice = "use norm_dtype=torch.float32" if dtype != torch.float32 else "scale the vectors up"
    check_underflow(norms, stored, "a vector norm", codec, advice)
    return stored


def check_underflow(values: torch.Tensor, stored: torch.Tensor, what: str, codec: str, advice: str) -> None:
    """Refuse values so small that their storage dtype keeps fewer than 8 significant bits of them (fp16
    subnormals, or 0): the vector or block would decode with a scale off by percents, or as zeros."""
    values = values.float()
    lost = (stored.float() - values).abs() > values.abs() * 2**-8
    if lost.any():
        smallest = values[lost].abs().min().item()
        raise ValueError(
            f"{codec}: {what} ({smallest:.3g}) underflows its {stored.dtype} storage (smallest normal "
            f"{torch.finfo(stored.dtype).tiny:.3g}); {advice}"
        )


def buffer_nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.buffers()) + list(module.parameters()))
