"""AttentionEvalModule: attention quality of a compressed K/V against the exact one, with real queries."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from ..kv.builder import CodecBank
from ..metrics.attention import per_query_metrics, relative_mse
from ..metrics.torch_metrics import QueryMean, StoredBits

EXACT_BITS = 16  # the uncompressed cache: bf16 / fp16


def compress_side(codec, x: torch.Tensor, sink_tokens: int) -> tuple[torch.Tensor, object, int]:
    """(x̂, the code of the tokens after the sinks or None, bytes): the first `sink_tokens` stay exact at
    16 bits and are counted so."""
    sink = min(sink_tokens, len(x))
    exact_bytes = x[:sink].numel() * EXACT_BITS // 8
    if codec is None:
        return x, None, x.numel() * EXACT_BITS // 8
    if sink == len(x):
        return x, None, exact_bytes
    code = (
        codec.quantize(x[sink:], start=sink)
        if getattr(codec, "positional", False)
        else codec.quantize(x[sink:])
    )
    return torch.cat([x[:sink].float(), codec.dequantize(code)]), code, exact_bytes + code.nbytes


def compress_block(bank: CodecBank, item: dict, device, sink_tokens: int = 0) -> dict:
    """Exact and approximate scaled logits, exact and decoded values, each side's per-vector relative MSE,
    and the bytes each side stores; the first `sink_tokens` keys and values are kept exact."""
    q, k, v, scaling = item["q"].double(), item["k"], item["v"], item["scaling"]
    exact = (q @ k.double().T) * scaling
    key_codec = bank.get("key", item["layer"], item["kv_head"], device)
    value_codec = bank.get("value", item["layer"], item["kv_head"], device)
    k_hat, key_code, key_bytes = compress_side(key_codec, k, sink_tokens)
    v_hat, _, value_bytes = compress_side(value_codec, v, sink_tokens)
    approx = exact
    if key_code is not None:  # Prod: the unbiased estimator, not ⟨q, k̂⟩
        coded = key_codec.score(item["q"].float(), key_code).double() * scaling
        approx = torch.cat([exact[..., : len(k) - coded.shape[-1]], coded], -1)
    return {
        "exact": exact,
        "approx": approx,
        "v": v,
        "v_hat": v_hat,
        "key_rel_mse": relative_mse(k, k_hat),
        "value_rel_mse": relative_mse(v, v_hat),
        "key_bytes": key_bytes,
        "value_bytes": value_bytes,
    }


class AttentionEvalModule(L.LightningModule):
    def __init__(self, bank: CodecBank, columns: dict, top_k: int = 8, sink_tokens: int = 0):
        super().__init__()
        self.bank, self.columns, self.top_k, self.sink_tokens = bank, columns, top_k, sink_tokens
        names = [
            "logit_cosine",
            "logit_correlation",
            "output_cosine",
            "output_rel_error",
            "attention_kl",
            "top1_agreement",
            f"top{top_k}_overlap",
            "spearman",
            "key_rel_mse",
            "value_rel_mse",
        ]
        self.metrics = nn.ModuleDict({n: QueryMean() for n in names})
        self.key_bits, self.value_bits, self.kv_bits = StoredBits(), StoredBits(), StoredBits()
        self.rows: list[dict] = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        for b in range(batch["q"].shape[0]):
            item = {
                "q": batch["q"][b],
                "k": batch["k"][b],
                "v": batch["v"][b],
                "layer": int(batch["layer"][b]),
                "kv_head": int(batch["kv_head"][b]),
                "sequence": int(batch["sequence"][b]),
                "scaling": float(batch["scaling"][b]),
                "sliding_window": int(batch["sliding_window"][b]),
            }
            bad = [n for n in ("q", "k", "v") if not torch.isfinite(item[n]).all()]
            if bad:  # a NaN would silently drop its queries from every mean
                raise ValueError(
                    f"test sequence {item['sequence']}, layer {item['layer']}, KV head {item['kv_head']}: "
                    f"{'/'.join(bad)} contain NaN or Inf; the KV source is damaged or its data overflowed"
                )
            out = compress_block(self.bank, item, self.device, self.sink_tokens)
            per_query = per_query_metrics(
                out["exact"], out["approx"], out["v"], out["v_hat"], self.top_k, item["sliding_window"]
            )
            coords = item["k"].numel()
            self.key_bits.update(out["key_bytes"], coords)
            self.value_bits.update(out["value_bytes"], coords)
            self.kv_bits.update(out["key_bytes"] + out["value_bytes"], 2 * coords)
            row = {
                **self.columns,
                "layer": item["layer"],
                "kv_head": item["kv_head"],
                "sequence": item["sequence"],
            }
            per_vector = {name: out[name] for name in ("key_rel_mse", "value_rel_mse")}
            for name, values in {**per_query, **per_vector}.items():
                self.metrics[name].update(values)
                row[name] = float(values[~values.isnan()].mean()) if (~values.isnan()).any() else float("nan")
            row["key_bits_per_coordinate"] = 8 * out["key_bytes"] / coords
            row["value_bits_per_coordinate"] = 8 * out["value_bytes"] / coords
            self.rows.append(row)

    def on_test_epoch_end(self) -> None:
        # compute() already sums the states of every process; rank 0 logs the result
        for name, metric in self.metrics.items():
            self.log(f"test/{name}", metric.compute().float(), rank_zero_only=True)
        self.log("test/key_bits_per_coordinate", self.key_bits.compute().float(), rank_zero_only=True)
        self.log("test/value_bits_per_coordinate", self.value_bits.compute().float(), rank_zero_only=True)
        self.log("test/kv_bits_per_coordinate", self.kv_bits.compute().float(), rank_zero_only=True)
        self.log(
            "test/memory_ratio_vs_16bit", (self.kv_bits.compute() / EXACT_BITS).float(), rank_zero_only=True
        )

    def undefined(self) -> dict[str, int]:
        """Per metric, how many queries (vectors, for the relative MSEs) it was undefined for and left out
        of the mean (e.g. a cosine of an all-zero vector, a rank correlation over one key); over every
        process, read after `summary()`."""
        return {name: m.undefined_total for name, m in self.metrics.items()}

    def summary(self, units: list[tuple[int, int]]) -> dict:
        """Overall means (torchmetrics, synced across processes), effective bits, and the per-layer constants
        (codebooks, rotations, projections, channel sets) of every (layer, KV head) unit."""
        out = {name: float(m.compute()) for name, m in self.metrics.items()}
        out["key_bits_per_coordinate"] = float(self.key_bits.compute())
        out["value_bits_per_coordinate"] = float(self.value_bits.compute())
        out["kv_bits_per_coordinate"] = float(self.kv_bits.compute())
        out["memory_ratio_vs_16bit"] = out["kv_bits_per_coordinate"] / EXACT_BITS
        out["constant_bytes"] = self.bank.constant_nbytes(units, self.device)
        return out
