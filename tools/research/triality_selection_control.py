"""Control for the per-layer view selection: the same selection between two fits of the *same* view (vector,
seeds s and s + 1), so that a gain from picking the better of two fits per layer is not read as a gain from
the views.

    .venv/bin/python tools/research/triality_selection_control.py captures/smollm2-135m-ca5dc1531e01 \
        multirun/learned_data_aware/train_triality --out outputs/research/triality_selection_control
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from tqlab.capture.store import CaptureStore
from tqlab.fit.select import merge_per_layer, select_per_layer
from tqlab.kv.spec import FittedRotations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("capture")
    parser.add_argument("fits", type=Path)
    parser.add_argument("--out", type=Path, default=Path("outputs/research/triality_selection_control"))
    args = parser.parse_args()
    store = CaptureStore(args.capture, verify=False)

    @functools.lru_cache(maxsize=None)
    def keys(layer: int, head: int) -> torch.Tensor:
        return torch.cat([store.load("train", layer, s, head)["k"] for s in range(store.num_sequences("train"))])

    vector = {}
    for job in sorted(p for p in args.fits.iterdir() if (p / "result" / "best.safetensors").is_file()):
        fitted = FittedRotations.read(job / "result" / "best.safetensors")
        if fitted.facts["rotation_options"]["view"] == "vector":
            vector[fitted.seed] = job / "result" / "best.safetensors"
    seeds = sorted(vector)
    for i, seed in enumerate(seeds):
        other = seeds[(i + 1) % len(seeds)]
        candidates = {f"seed{seed}": vector[seed], f"seed{other}": vector[other]}
        choice, scores = select_per_layer(candidates, store, lambda side, layer, head: keys(layer, head))
        out = merge_per_layer(choice, candidates, args.out / f"seed{seed}" / "best.safetensors", "best_of_two_seeds")
        print(f"seed {seed} vs {other}: {sum(v == f'seed{seed}' for v in choice.values())} layers keep seed {seed}; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
