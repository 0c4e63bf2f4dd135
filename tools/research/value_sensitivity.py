"""Value sensitivity per (layer, KV head, channel group): two estimators, train against test.

    .venv/bin/python tools/research/value_sensitivity.py captures/smollm2-135m-ca5dc1531e01 \
        --out docs/results/value_sensitivity

Both estimators ask how much harm noise in one group of 8 value channels does, for noise whose variance is
proportional to the group's energy (what a codec that normalises what it codes adds: D(b) · ‖v_t[g]‖² per
token, independent across tokens):
- attention output (captured post-RoPE q, k, v; real queries, causal softmax p): the expected squared error
  of every query's attention output, Σ_t p_qt² ‖v_t[g]‖², averaged over queries and divided by the mean
  ‖o_q‖² — exact in expectation, no sampling;
- gradient proxy (the model itself, next-token loss on whole windows): the first-order change of the loss,
  E[(∂L/∂v_t[g] · δ_t[g])²] = ‖∂L/∂v_t[g]‖² ‖v_t[g]‖² / 8 summed over tokens (a Fisher-style score).
Each is computed on the train split and on the test split (the capture's documents; the gradient proxy on the
same split's documents, one window each). Printed: rank agreement (Spearman) between estimators and between
splits, over all cells and within each unit; the share of the top-quartile cells two rankings share. Written:
heatmaps (log10 of each cell's share of its estimator's total) and a CSV of every cell.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from tqlab.capture.models import load_model
from tqlab.capture.store import CaptureStore
from tqlab.capture.text import split_documents, token_windows, wiki_documents
from tqlab.tasks.common import attention_weights

GROUP = 8  # channels per group, as the fractional-bit codecs split them


def attention_sensitivity(store: CaptureStore, split: str, sequences: int) -> np.ndarray:
    """[layers, KV heads, groups]: Σ_t p_qt² ‖v_t[g]‖² over queries / Σ_q ‖o_q‖²."""
    heads, d = store.architecture["num_kv_heads"], store.architecture["head_dim"]
    out = np.zeros((len(store.layers), heads, d // GROUP))
    n = min(sequences, store.num_sequences(split))
    for i, layer in enumerate(store.layers):
        for h in range(heads):
            harm, energy = torch.zeros(d // GROUP, dtype=torch.float64), 0.0
            for s in range(n):
                block = store.load(split, layer, s, h)
                q, k, v = (block[x].double() for x in "qkv")
                t = k.shape[0]
                group_energy = v.pow(2).view(t, d // GROUP, GROUP).sum(-1)  # [T, groups]
                harm += attention_weights(q, k) @ group_energy  # Σ_t (Σ_q p_qt²) ‖v_t[g]‖²
                logits = (q @ k.T / d**0.5).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
                energy += (torch.softmax(logits, dim=-1) @ v).pow(2).sum().item()
            out[i, h] = (harm / energy).numpy()
    return out


def gradient_sensitivity(model, windows, heads: int, d: int) -> np.ndarray:
    """[layers, KV heads, groups]: Σ_t ‖∂L/∂v_t[g]‖² ‖v_t[g]‖² / GROUP over windows (next-token NLL)."""
    layers = model.model.layers
    out = np.zeros((len(layers), heads, d // GROUP))
    for window in windows:
        values = []

        def keep(module, inputs, output):  # returns None: the output is not replaced
            output.retain_grad()
            values.append(output)

        hooks = [layer.self_attn.v_proj.register_forward_hook(keep) for layer in layers]
        ids = torch.tensor([window.ids])
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        for hook in hooks:
            hook.remove()
        for i, v in enumerate(values):
            v, g = v[0].detach().double(), v.grad[0].double()  # [T, KVH·d]
            score = (g.pow(2) * v.pow(2)).view(-1, heads, d // GROUP, GROUP).sum((0, 3)) / GROUP
            out[i] += score.numpy()
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(Spearman over all cells, median Spearman within units, top-quartile overlap)."""
    overall = stats.spearmanr(a.ravel(), b.ravel()).statistic
    within = np.median(
        [stats.spearmanr(a[i, h], b[i, h]).statistic for i in range(a.shape[0]) for h in range(a.shape[1])]
    )
    k = a.size // 4
    top_a, top_b = set(np.argsort(-a.ravel())[:k]), set(np.argsort(-b.ravel())[:k])
    return overall, within, len(top_a & top_b) / k


def heatmaps(scores: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 6), sharey=True)
    for ax, (name, s) in zip(axes, scores.items(), strict=True):
        share = s / s.sum()
        image = ax.imshow(np.log10(share.reshape(s.shape[0], -1)), aspect="auto", cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("KV head × channel group")
        fig.colorbar(image, ax=ax, shrink=0.6, label="log10 share of total")
    axes[0].set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("capture")
    parser.add_argument("--sequences", type=int, default=12, help="per split, for both estimators")
    parser.add_argument("--out", type=Path, default=Path("outputs/research/value_sensitivity"))
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    store = CaptureStore(args.capture, verify=False)
    heads, d = store.architecture["num_kv_heads"], store.architecture["head_dim"]
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    docs = split_documents(wiki_documents(), (0.7, 0.15, 0.15), seed=0)  # conf/data/wiki.yaml's split
    scores = {}
    for split in ("train", "test"):
        scores[f"attention output, {split}"] = attention_sensitivity(store, split, args.sequences)
        windows = token_windows(tokenizer, docs[split], 256, args.sequences)
        scores[f"gradient proxy, {split}"] = gradient_sensitivity(model, windows, heads, d)
        print(f"{split}: {len(windows)} windows for the gradient proxy", flush=True)
    names = list(scores)
    print(f"\n{len(store.layers)} layers × {heads} KV heads × {d // GROUP} groups of {GROUP} channels\n")
    print("| rankings compared | Spearman, all cells | median Spearman within a unit | top-quartile overlap |")
    print("| --- | --- | --- | --- |")
    for a, b in [(0, 2), (1, 3), (0, 1), (2, 3)]:
        overall, within, top = agreement(scores[names[a]], scores[names[b]])
        print(f"| {names[a]} vs {names[b]} | {overall:.2f} | {within:.2f} | {top:.0%} |")
    for name, s in scores.items():
        share = np.sort(s.ravel() / s.sum())[::-1]
        print(f"\n{name}: top 10 % of cells hold {share[: s.size // 10].sum():.0%} of the total; "
              f"per-layer share {np.round(s.sum((1, 2)) / s.sum(), 3).tolist()}")
    args.out.mkdir(parents=True, exist_ok=True)
    heatmaps(scores, args.out / "heatmaps.png")
    with open(args.out / "cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "kv_head", "group", *names])
        for i, layer in enumerate(store.layers):
            for h in range(heads):
                for g in range(d // GROUP):
                    writer.writerow([layer, h, g, *(f"{scores[n][i, h, g]:.6g}" for n in names)])
    print(f"\nwrote {args.out}/heatmaps.png and cells.csv")


if __name__ == "__main__":
    main()
