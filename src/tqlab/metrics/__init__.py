"""Attention-quality metrics: per-query functions (`attention`) and torchmetrics accumulators (`torch_metrics`)."""

from .attention import causal_mask, per_query_metrics

__all__ = ["causal_mask", "per_query_metrics"]
