"""Per-head mean removal around any codec: code x − μ, with μ fitted on train-split vectors, stored once.

A key's mean adds the same q·μ to every logit of a query, which softmax ignores, so keys lose nothing by
being coded around it — yet it often carries most of their energy (a bias in the key projection, RoPE'd
constant directions), which a codec that stores one norm per vector then spends its bits on. Scores add
q·μ back all the same, so that codes and exact tokens (sinks, the recent window) share one scale; a
weighted sum of values adds (Σ p)·μ once, not once per token.
"""

from __future__ import annotations

import torch
from torch import nn

from .codes import Code, check_input


class Centered(nn.Module):
    def __init__(self, inner: nn.Module, mean: torch.Tensor):
        super().__init__()
        if mean.shape != (inner.dim,):
            raise ValueError(
                f"Centered: the mean has shape {tuple(mean.shape)}, the codec codes dim={inner.dim}"
            )
        self.inner, self.dim = inner, inner.dim
        self.register_buffer("mean", mean.float())

    def quantize(self, x: torch.Tensor) -> Code:
        return self.inner.quantize(check_input(x, self.dim, self.mean.device, "Centered") - self.mean)

    def dequantize(self, code: Code) -> torch.Tensor:
        return self.inner.dequantize(code) + self.mean

    def score(self, queries: torch.Tensor, code: Code) -> torch.Tensor:
        q = check_input(queries, self.dim, self.mean.device, "Centered.score")
        return self.inner.score(q, code) + (q @ self.mean)[..., None]

    def constant_nbytes(self) -> int:
        return self.inner.constant_nbytes() + self.mean.numel() * self.mean.element_size()
