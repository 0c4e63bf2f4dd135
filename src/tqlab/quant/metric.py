"""Keys coded in the metric of the head's queries.

What attention needs of a key is its logits q·k, so the error that matters is E_q[(q·(k − k̂))²] =
(k − k̂)ᵀ Σ_q (k − k̂), Σ_q the second moment of the head's real queries — not ‖k − k̂‖². With
Σ_q = U Λ Uᵀ, a codec applied to z = Λ^{1/2} Uᵀ k minimises exactly that: its squared error in z is the
expected squared logit error. The query is mapped once per step, q ↦ Λ^{-1/2} Uᵀ q, and q·k = that · z, so
scores come from the codes as before. Keys only: values are read through attention weights, not a query.
"""

from __future__ import annotations

import torch
from torch import nn

from .codes import Code, check_input

# Σ_q is shrunk towards its mean eigenvalue: Σ_q + α·tr(Σ_q)/d·I. Unshrunk (α = 0), held-out logit error
# *rises*: directions where train queries are small get a fine grid in z, so keys' errors there are
# multiplied back by 1/√λ, and held-out queries do read them. α was chosen on the validation split of
# SmolLM2's capture (docs/results.md); α → ∞ is plain coding.
SHRINKAGE = 10.0


def query_metric_maps(
    queries: torch.Tensor, shrinkage: float = SHRINKAGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_map, query_map) from real queries [n, d]: z = k @ key_map, and q @ query_map · z = q · k."""
    q = queries.double()
    second_moment = q.T @ q / len(q)
    d = len(second_moment)
    second_moment += shrinkage * torch.trace(second_moment) / d * torch.eye(d, dtype=q.dtype)
    evals, evecs = torch.linalg.eigh(second_moment)
    scale = evals.clamp_min(1e-12 * evals.max()).sqrt()  # only a rank-deficient Σ_q with α = 0 needs it
    return (evecs * scale).float(), (evecs / scale).float()


class QueryWeighted(nn.Module):
    def __init__(self, inner: nn.Module, key_map: torch.Tensor, query_map: torch.Tensor):
        super().__init__()
        self.inner, self.dim = inner, inner.dim
        self.register_buffer("key_map", key_map.float())
        self.register_buffer("query_map", query_map.float())

    def quantize(self, x: torch.Tensor) -> Code:
        return self.inner.quantize(
            check_input(x, self.dim, self.key_map.device, "QueryWeighted") @ self.key_map
        )

    def dequantize(self, code: Code) -> torch.Tensor:
        return self.inner.dequantize(code) @ self.query_map.T  # key_map⁻¹ = query_mapᵀ

    def score(self, queries: torch.Tensor, code: Code) -> torch.Tensor:
        q = check_input(queries, self.dim, self.key_map.device, "QueryWeighted.score")
        return self.inner.score(q @ self.query_map, code)

    def constant_nbytes(self) -> int:
        """The codec's constants and both maps, as held (one matrix and the eigenvalues would do)."""
        return self.inner.constant_nbytes() + 2 * self.key_map.numel() * self.key_map.element_size()
