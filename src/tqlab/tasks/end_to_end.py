"""eval.py's end-to-end tasks: the model itself runs with a TurboQuantCache built from the run's spec, on
held-out test documents, against the same model with its uncompressed cache.

task=perplexity: next-token NLL per strided window, next-token KL and top-1 agreement, hidden-state cosine
and relative error per layer. task=niah: needle-in-a-haystack over contexts × depths. task=generate: greedy
continuations of held-out prompts and where they first diverge. Rows go into the same results schema as
the attention evaluation, one per window / prompt / (context, depth).
"""

from __future__ import annotations

import json
import math

from omegaconf import DictConfig

from . import common


def _test_documents(sections: dict, tokenizer, limit: int) -> list[tuple[str, list[int]]]:
    """(title, token ids) of the test split's documents, in the split's order (the capture's split), each
    starting the way the tokenizer starts a text (with BOS where it adds one)."""
    from ..capture.run import capture_spec, split_texts
    from ..capture.text import leading_bos

    spec = capture_spec(sections["model"], sections["data"], sections["store"]["layers"])
    bos = leading_bos(tokenizer)
    start = [] if bos is None else [bos]
    docs = split_texts(spec)["test"][:limit]
    return [(d.title, start + tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs]


def run(cfg: DictConfig, sections: dict, results, loggers=()) -> None:
    """Run the end-to-end task of `cfg` into the claimed results folder, and log its results."""
    import torch
    from tqdm import tqdm

    from ..capture.models import load_model
    from ..registry import RuleError
    from ..results import BLOCK_COLUMNS, PER_TOKEN, write_results

    common.seed_lightning(cfg.seed)
    spec, settings = sections["spec"], sections["end_to_end"]
    loaded = load_model(
        **{k: sections["model"][k] for k in ("name_or_path", "dtype", "weight_load", "device")}
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    spec.check_head_dim(loaded.facts["architecture"]["head_dim"])
    calibration = common.calibration(cfg, spec)
    layout = sections["cache"]
    protocol = layout["protocol"]
    columns = {
        "task": cfg.task,
        "protocol": protocol,
        "model": sections["model"]["name_or_path"],
        "data": sections["data"]["source"],
        "capture": None,
        **spec.columns(),
        "exact_layers": json.dumps(list(layout["exact_layers"])),
        "sink_tokens": layout["sink_tokens"],
        "recent_window": layout["recent_window"],
        "settings": json.dumps(settings, sort_keys=True),
    }
    rows, per_layer, constants = [], [], 0
    progress = cfg.get("progress", True)
    if cfg.task == "perplexity":
        from ..evaluate.perplexity import compare_window, first_chunk, windows

        context, stride = settings["context"], settings["stride"]
        prefill = settings["prefill"] or first_chunk(protocol, context, stride, layout["recent_window"], spec)
        docs = _test_documents(sections, tokenizer, 10**6)
        # WikiText-2's test split is one long document: its windows are all consecutive ones
        per_document = (
            None if sections["data"]["source"] == "wikitext2" else sections["data"]["windows_per_document"]
        )
        # prefill_exact scores the tokens after the prompt, the first predicted by the exact prompt itself:
        # a window needs two more tokens than the prompt for one prediction that reads codes
        shortest = prefill + 2 if protocol == "prefill_exact" else 2
        items = windows(docs, context, stride, settings["max_windows"], per_document, shortest)
        if not items:
            raise RuleError(
                f"task=perplexity: no test document has the {shortest} tokens a window needs (a {prefill}-token "
                f"first chunk under cache.protocol={protocol}, perplexity.context={context}); lower "
                "perplexity.context or perplexity.prefill"
            )
        for w in tqdm(items, desc="perplexity", unit="window", disable=not progress):
            out = compare_window(model, w, spec, layout, prefill, settings["chunk_size"], calibration)
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
            out = compare_generation(model, prompt, spec, layout, settings["max_new_tokens"], calibration)
            rows.append(
                {
                    **columns,
                    "document": title,
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
            out = needle_pair(
                model,
                tokenizer,
                prompt,
                str(settings["value"]),
                spec,
                layout,
                calibration,
                settings["max_new_tokens"],
            )
            rows.append(
                {
                    **columns,
                    "document": title,
                    "context": context,
                    "depth": depth,
                    "found": out["found"],
                    "found_reference": out["found_reference"],
                    "cache_bytes_per_token": out["cache_bytes_per_token"],
                    "reference_bytes_per_token": out["reference_bytes_per_token"],
                }
            )
    if not rows:
        raise RuleError(
            f"task={cfg.task} found no held-out text to run on: the test documents are shorter than the "
            "prompt/window settings; lower them or add documents"
        )
    metric_names = [k for k in rows[0] if k not in columns and k not in (*BLOCK_COLUMNS[cfg.task], "tokens")]
    overall = {m: sum(r[m] for r in rows) / len(rows) for m in metric_names}
    if cfg.task == "perplexity":  # per-token metrics token-weighted, as perplexity is defined
        tokens = sum(r["tokens"] for r in rows)
        for m in PER_TOKEN:
            overall[m] = sum(r[m] * r["tokens"] for r in rows) / tokens
        overall["perplexity"], overall["perplexity_reference"] = (
            math.exp(overall["nll"]),
            math.exp(overall["nll_reference"]),
        )
        overall["constant_bytes"] = constants
    summary = {"overall": overall, "columns": columns, "blocks": len(rows), "settings": settings}
    if per_layer:
        weights = [r["tokens"] for r in rows]  # each window's per-token means, weighted as the overall ones
        summary["per_layer_hidden"] = {
            name: [
                sum(p[name][i] * w for p, w in zip(per_layer, weights, strict=True)) / sum(weights)
                for i in range(len(per_layer[0][name]))
            ]
            for name in per_layer[0]
        }
    written = write_results(results, rows, summary, task=cfg.task)
    common.log_results(loggers, rows, written["overall"])
