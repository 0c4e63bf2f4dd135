"""transformers' own QuantizedCache (optimum-quanto backend) on the same held-out windows as
`eval.py task=perplexity cache.protocol=prefill_exact perplexity.max_windows=4`, for the end-to-end table.

    pip install optimum-quanto
    .venv/bin/python tools/research/transformers_quantized_cache.py --nbits 4 2

Its protocol is prefill-exact by construction: a forward pass attends to its own keys exactly, and the
cache re-quantizes its full-precision residual every `residual_length` tokens (tqlab never re-quantizes).
Bytes are counted from every tensor the cache holds, quanto's packed data, scales and shifts included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import QuantizedCache

from tqlab.capture.models import load_model
from tqlab.config import run_sections
from tqlab.evaluate.perplexity import compare_window, windows
from tqlab.tasks.end_to_end import _test_documents

ROOT = Path(__file__).parents[2]


def tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a quanto tensor: its packed data, scales and shifts
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class CountedQuantizedCache(QuantizedCache):
    def nbytes(self) -> dict:
        held = [v for layer in self.layers for v in vars(layer).values() if isinstance(v, torch.Tensor)]
        return {"stored": sum(tensor_bytes(t) for t in held), "constants": 0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nbits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--residual-length", type=int, default=128)
    args = parser.parse_args()
    overrides = ["task=perplexity", "cache.protocol=prefill_exact", "perplexity.max_windows=4", "kv=full_kv"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    sections = run_sections(cfg)
    m = sections["model"]
    loaded = load_model(**{k: m[k] for k in ("name_or_path", "dtype", "weight_load", "device")})
    settings = sections["end_to_end"]
    context, stride = settings["context"], settings["stride"]
    docs = _test_documents(sections, loaded.tokenizer, 10**6)
    items = windows(docs, context, stride, settings["max_windows"], sections["data"]["windows_per_document"])
    print(
        "| quanto bits | residual | cache bytes/token | perplexity (uncompressed) | next-token KL | top-1 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for nbits in args.nbits:
        rows = []
        for w in items:
            cache = CountedQuantizedCache(
                backend="quanto",
                config=loaded.model.config,
                nbits=nbits,
                residual_length=args.residual_length,
            )
            out = compare_window(
                loaded.model, w, None, {"protocol": "prefill_exact"}, context - stride, 1, cache=cache
            )
            rows.append(out["row"])
        n = sum(r["tokens"] for r in rows)
        mean = {
            k: sum(r[k] * r["tokens"] for r in rows) / n
            for k in ("nll", "nll_reference", "next_token_kl", "next_token_top1")
        }
        per_token = sum(r["cache_bytes_per_token"] for r in rows) / len(rows)
        ppl, ref = torch.tensor(mean["nll"]).exp().item(), torch.tensor(mean["nll_reference"]).exp().item()
        print(
            f"| {nbits} | {args.residual_length} | {per_token:,.0f} | {ppl:.2f} ({100 * (ppl / ref - 1):+.1f} %; {ref:.2f}) "
            f"| {mean['next_token_kl']:.3f} | {mean['next_token_top1']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
