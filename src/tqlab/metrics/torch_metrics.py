"""torchmetrics accumulators whose states are sums, so batches and GPUs add up to the one-pass value."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class QueryMean(Metric):
    """Mean of per-query values over every query seen. NaN entries (metric undefined for that query, e.g. a
    cosine of an all-zero vector) are left out of the mean and counted in `undefined`, never dropped silently."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("undefined", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.double().flatten()
        defined = values[~values.isnan()]
        self.total += defined.sum()
        self.count += defined.numel()
        self.undefined += values.numel() - defined.numel()

    def compute(self) -> torch.Tensor:
        self.undefined_total = int(self.undefined)  # states are summed over processes inside compute()
        return self.total / self.count


class StoredBits(Metric):
    """Effective bits per coordinate over everything encoded: 8 · stored bytes / coordinates."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("bytes", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("coordinates", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nbytes: float, coordinates: float) -> None:
        self.bytes += nbytes
        self.coordinates += coordinates

    def compute(self) -> torch.Tensor:
        return 8 * self.bytes / self.coordinates
