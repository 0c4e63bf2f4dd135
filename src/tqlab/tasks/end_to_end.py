"""eval.py's end-to-end tasks: the model itself runs with a TurboQuantCache built from the run's spec, on
held-out test documents, against the same model with its uncompressed cache.

task=perplexity: next-token NLL per strided window, next-token KL and top-1 agreement, hidden-state cosine
and relative error per layer. task=niah: needle-in-a-haystack over contexts × depths. task=generate: greedy
continuations of held-out prompts and where they first diverge. Rows go into the same results schema as
the attention evaluation, one per window / prompt / (context, depth).
"""

from __future__ import annotations

import json
import logging
import math

from omegaconf import DictConfig

from ..config import check_environment, run_sections
from . import common

log = logging.getLogger("tqlab")


def run(cfg: DictConfig) -> common.Outcome:
    sections = run_sections(cfg)
    check_environment(cfg)
    spec = sections["spec"]
    fitted = {s.rotation.fitted.sha256 for s in spec.sides().values() if s.rotation.fitted}
    extra = {"rotations_sha256": fitted.pop()} if fitted else {}
    with common.results_folder(cfg, "summary.json", common.tags(spec), extra) as (results, loggers):
        if loggers is not None:
            _run(cfg, sections, results)
    summary = (
        json.loads((results / "summary.json").read_text()) if (results / "summary.json").is_file() else {}
    )
    overall = summary.get("overall", {})
    if overall:
        log.info("results in %s: %s", results, json.dumps({k: round(v, 5) for k, v in overall.items()}))
    return common.Outcome(results, overall)


def _test_documents(sections: dict, tokenizer, limit: int) -> list[tuple[str, list[int]]]:
    """(title, token ids) of the test split's documents, in the split's order (the capture's split)."""
    from ..capture.run import _documents, capture_spec

    spec = capture_spec(sections["model"], sections["data"], sections["store"]["layers"])
    docs = _documents(spec)["test"][:limit]
    return [(d.title, tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs]


def _calibration(cfg, spec):
    """Train-split vectors from the capture, for fractional bits' outlier channels (None when not needed)."""
    if all(float(s.codec.bits).is_integer() for s in spec.sides().values()):
        return None
    import torch

    source = common.kv_source(cfg)
    n = min(cfg.eval.calibration_sequences, source.num_sequences("train"))

    def calibration(side: str, layer: int, head: int):
        return torch.cat(
            [source.load("train", layer, s, head)["k" if side == "key" else "v"] for s in range(n)]
        )

    return calibration


def _run(cfg, sections, results) -> None:
    import torch
    from tqdm import tqdm

    from ..capture.models import load_model
    from ..results import write_results

    common.seed_lightning(cfg.seed)
    spec, settings = sections["spec"], sections["end_to_end"]
    loaded = load_model(
        **{k: sections["model"][k] for k in ("name_or_path", "dtype", "weight_load", "device")}
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    spec.check_head_dim(head_dim)
    calibration = _calibration(cfg, spec)
    protocol, exact_layers = settings["protocol"], tuple(settings["exact_layers"])
    columns = {
        "task": cfg.task,
        "protocol": protocol,
        "model": sections["model"]["name_or_path"],
        "data": sections["data"]["source"],
        "capture": None,
        **spec.columns(),
    }
    rows, per_layer, constants = [], [], 0
    progress = cfg.get("progress", True)
    if cfg.task == "perplexity":
        from ..evaluate.perplexity import compare_window, windows

        context, stride = settings["context"], settings["stride"]
        prefill = settings["prefill"] or (context if protocol == "all_quantized" else context - stride)
        docs = _test_documents(sections, tokenizer, 10**6)
        per_document = sections["data"].get("windows_per_document")
        items = windows(docs, context, stride, settings["max_windows"], per_document)
        for w in tqdm(items, desc="perplexity", unit="window", disable=not progress):
            out = compare_window(
                model, w, spec, protocol, prefill, settings["chunk_size"], calibration, exact_layers
            )
            rows.append({**columns, **out["row"]})
            per_layer.append(out["per_layer"])
            constants = out["constant_bytes"]
        for row in rows:
            row["nll_increase"] = row["nll"] - row["nll_reference"]
    elif cfg.task == "generate":
        from ..evaluate.generation import compare_generation

        docs = [d for d in _test_documents(sections, tokenizer, 10**6) if len(d[1]) >= settings["prompt_len"]]
        for title, ids in tqdm(
            docs[: settings["prompts"]], desc="generate", unit="prompt", disable=not progress
        ):
            prompt = torch.tensor(ids[: settings["prompt_len"]])
            out = compare_generation(model, prompt, spec, protocol, settings["max_new_tokens"], exact_layers)
            rows.append(
                {
                    **columns,
                    "document": title,
                    "prompt": 0,
                    "divergence": out["divergence"],
                    "agreement": out["agreement"],
                }
            )
    else:
        from ..evaluate.needle import needle_pair, needle_prompt

        title, haystack = max(_test_documents(sections, tokenizer, 10**6), key=lambda d: len(d[1]))
        grid = [(c, d) for c in settings["contexts"] for d in settings["depths"]]
        for context, depth in tqdm(grid, desc="needle", unit="prompt", disable=not progress):
            prompt = needle_prompt(tokenizer, haystack, context, depth, str(settings["value"]))
            out = needle_pair(model, tokenizer, prompt, str(settings["value"]), spec, protocol, exact_layers)
            rows.append(
                {
                    **columns,
                    "document": title,
                    "context": context,
                    "depth": depth,
                    "found": out["found"],
                    "found_reference": out["found_reference"],
                }
            )
    metric_names = [
        k
        for k in rows[0]
        if k not in columns and k not in ("document", "window", "prompt", "context", "depth", "tokens")
    ]
    overall = {m: sum(r[m] for r in rows) / len(rows) for m in metric_names}
    if cfg.task == "perplexity":  # token-weighted, as perplexity is defined
        tokens = sum(r["tokens"] for r in rows)
        for m in ("nll", "nll_reference"):
            overall[m] = sum(r[m] * r["tokens"] for r in rows) / tokens
        overall["perplexity"], overall["perplexity_reference"] = (
            math.exp(overall["nll"]),
            math.exp(overall["nll_reference"]),
        )
        overall["constant_bytes"] = constants
    summary = {"overall": overall, "columns": columns, "blocks": len(rows), "settings": settings}
    if per_layer:
        summary["per_layer_hidden"] = {
            name: [
                sum(p[name][i] for p in per_layer) / len(per_layer) for i in range(len(per_layer[0][name]))
            ]
            for name in per_layer[0]
        }
    write_results(results, rows, summary, task=cfg.task)
