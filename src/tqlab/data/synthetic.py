"""Synthetic KV with the interface of a capture, for fast tests and controlled experiments.

kind="isotropic": q, k, v i.i.d. N(0, 1) — every rotation is equivalent here.
kind="outliers": per-channel scales drawn log-normally, a per-channel key mean, and `n_outliers` planted
key channels `outlier_scale`× larger (as real post-RoPE keys have); queries share the channel scales.
Each (split, layer, sequence) is generated from its own seed, so nothing is stored and splits are disjoint.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..config import SYNTHETIC_KINDS as KINDS


class SyntheticKV:
    def __init__(
        self,
        kind: str = "outliers",
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 64,
        seq_len: int = 128,
        sequences: dict | None = None,
        n_outliers: int = 4,
        outlier_scale: float = 10.0,
        seed: int = 0,
    ):
        if kind not in KINDS:
            raise ValueError(f"data.kind={kind!r} is not one of {KINDS}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.kind, self.seed, self.seq_len = kind, seed, seq_len
        self.n_outliers, self.outlier_scale = n_outliers, outlier_scale
        self.sequences = dict(sequences or {"train": 8, "validation": 2, "test": 4})
        self.architecture = {
            "model_type": f"synthetic-{kind}",
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
        }
        self.manifest = {"fingerprint": self.fingerprint, "model": {"name_or_path": f"synthetic-{kind}"}}

    @property
    def fingerprint(self) -> str:
        facts = (self.kind, self.seed, self.seq_len, self.n_outliers, self.outlier_scale, self.sequences)
        return hashlib.sha256(repr((facts, sorted(self.architecture.items()))).encode()).hexdigest()

    @property
    def layers(self) -> list[int]:
        return list(range(self.architecture["num_layers"]))

    @property
    def splits(self) -> list[str]:
        return list(self.sequences)

    def document_of(self, split: str, sequence: int) -> str:
        """Every synthetic sequence is drawn independently: its own document."""
        return f"synthetic-{split}-{sequence}"

    def num_sequences(self, split: str) -> int:
        return self.sequences[split]

    def layer_facts(self, layer: int) -> dict:
        return {"scaling": 1 / math.sqrt(self.architecture["head_dim"]), "sliding_window": None}

    def _generator(self, *parts) -> torch.Generator:
        digest = hashlib.sha256(repr((self.seed, *parts)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def load(
        self, split: str, layer: int, sequence: int, kv_head: int | None = None
    ) -> dict[str, torch.Tensor]:
        if split not in self.sequences or not 0 <= sequence < self.sequences[split]:
            raise IndexError(f"no sequence {sequence} in split {split!r} ({self.sequences})")
        a = self.architecture
        heads = range(a["num_kv_heads"]) if kv_head is None else [kv_head]
        groups = a["num_heads"] // a["num_kv_heads"]
        qs, ks, vs = [], [], []
        for h in heads:
            # channel statistics belong to (layer, head): shared by all splits, like a real model's
            g = self._generator("channels", layer, h)
            d = a["head_dim"]
            scale = (
                torch.ones(d) if self.kind == "isotropic" else torch.exp(0.5 * torch.randn(d, generator=g))
            )
            mean = torch.zeros(d) if self.kind == "isotropic" else 0.5 * torch.randn(d, generator=g)
            key_scale = scale.clone()
            if self.kind == "outliers":
                key_scale[torch.randperm(d, generator=g)[: self.n_outliers]] *= self.outlier_scale
            g = self._generator(split, layer, h, sequence)
            t = self.seq_len
            ks.append(torch.randn(t, d, generator=g) * key_scale + mean * key_scale)
            vs.append(torch.randn(t, d, generator=g) * scale)
            qs.append(torch.randn(groups, t, d, generator=g) * scale)
        q = torch.cat(qs)
        k, v = torch.stack(ks), torch.stack(vs)
        if kv_head is not None:
            k, v = k[0], v[0]
        return {"q": q, "k": k, "v": v, "positions": torch.arange(self.seq_len)}
