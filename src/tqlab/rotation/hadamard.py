"""Randomised fast Walsh-Hadamard rotation D2 · H · D1 in O(d log d), never a dense matrix."""

from __future__ import annotations

import functools
import math

import torch

from .base import Rotation

_RADIX = 16


def _sylvester(n: int, like: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def _factor(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_n of a butterfly stage (n <= 16), built once per dtype and device: rebuilding it was a dozen small
    ops per stage. A normal tensor even when first built under inference mode, so that a fit may use it."""
    with torch.inference_mode(False), torch.no_grad():
        return _sylvester(n, torch.empty(0, dtype=dtype, device=device))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last axis (length a power of two).

    H_d = H_16 ⊗ H_16 ⊗ … (Sylvester), applied one radix-16 butterfly stage at a time as a small
    matmul: log_16(d) passes of 16 multiply-adds per element, O(d log d) like the radix-2 form but
    with far fewer passes over memory. The first stage acts on the last axis, so it is one GEMM of all
    rows with H_16 (H is symmetric) rather than a batch of matrix-vector products; the others are one
    `bmm` with H_f expanded over the batch (a broadcast `H @ x` does not spread over CPU threads). Together:
    16.4 → 5.3 ms for 16 384 vectors at d = 256 on 2 threads (docs/benchmarks.md, benchmarks/hadamard_cpu.py).
    """
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"fwht needs a power-of-two length along the last axis, got {d}")
    shape = x.shape
    f = min(_RADIX, d)
    x = (x.reshape(-1, f) @ _factor(f, x.dtype, x.device)).reshape(-1, d)
    inner = f  # product of the factors already applied (the trailing axes)
    while inner < d:
        f = min(_RADIX, d // inner)
        blocks = x.reshape(-1, f, inner)
        x = torch.bmm(_factor(f, x.dtype, x.device).expand(blocks.shape[0], f, f), blocks).reshape(-1, d)
        inner *= f
    return x.reshape(shape)


def _random_signs(dim: int, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
    if signs.prod() < 0:  # an even number of −1 keeps det = +1 (det H = +1 for d >= 4)
        signs[0] = -signs[0]
    return signs


# On a CPU: the dense product below d = 256, the butterfly passes above it; at d = 256 the passes for batches of
# PASSES_ELEMENTS per thread (rows × d: 128 to 512 rows on one thread, up to a CPU quantize's block of rows,
# whose temporaries stay in L2: `quant.codes.CPU_BLOCK_ELEMENTS`), the dense product for the rest
# (benchmarks/hadamard_cpu.py).
DENSE_MAX_DIM = 256
PASSES_ELEMENTS = (1 << 15, 1 << 17)


class FastHadamard(Rotation):
    def __init__(self, dim: int, seed: int = 0):
        if dim < 4 or dim & (dim - 1):
            raise ValueError(
                f"fast_hadamard needs dim to be a power of two >= 4, got dim={dim}; "
                "use random_haar (dense) or block_so8_static for this dim"
            )
        super().__init__(dim)
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("signs_in", _random_signs(dim, g))
        self.register_buffer("signs_out", _random_signs(dim, g))
        self.scale = 1 / math.sqrt(dim)
        self._dense_cache = None  # the dense form, built on first use on a GPU (not a buffer: not counted)
        self.register_load_state_dict_post_hook(self._forget_dense)

    def dense(self) -> torch.Tensor:
        """Π as a d × d matrix, built from its factors (D₂ · H · D₁ / √d)."""
        h = _sylvester(self.dim, self.signs_in)
        return (self.signs_out[:, None] * h * self.signs_in[None, :]) * self.scale

    # One dense d × d product beats the butterfly passes on a GPU (4.5× at d = 64 on an H200). On a CPU it wins on
    # small batches (a decode step's vectors: 3–10× up to d = 256) and up to d = 128; on large ones the passes'
    # time depends on the allocator's state (their temporaries leave the cache), the product's does not.
    def _dense_wins(self, x) -> bool:
        if x.is_cuda or self.dim < DENSE_MAX_DIM:
            return True
        if self.dim > DENSE_MAX_DIM:
            return False
        few, many = PASSES_ELEMENTS
        return not few <= x.numel() <= many * torch.get_num_threads()

    def _rotate(self, x):
        if self._dense_wins(x):
            return x @ self._dense_on(x).T
        return fwht(x * self.signs_in) * (self.scale * self.signs_out)

    def _unrotate(self, y):
        if self._dense_wins(y):
            return y @ self._dense_on(y)
        return fwht(y * self.signs_out) * (self.scale * self.signs_in)

    def _dense_on(self, x: torch.Tensor) -> torch.Tensor:
        cached = self._dense_cache
        if cached is None or cached.device != x.device or cached.dtype != x.dtype:
            # a normal tensor even when first built under inference mode (an eval), so that a later fit may use it
            with torch.inference_mode(False), torch.no_grad():
                cached = self._dense_cache = self.dense().to(device=x.device, dtype=x.dtype)
        return cached

    @staticmethod
    def _forget_dense(module, incompatible_keys) -> None:
        module._dense_cache = None  # load_state_dict copied new signs in
