"""eval.py's task: attention quality of the configured compressed cache on the test split."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from ..config import check_environment, run_sections
from . import common

log = logging.getLogger("tqlab")


def evaluate(cfg: DictConfig) -> common.Outcome:
    """Evaluate on the test split; returns the results folder and the overall metrics. task=perplexity, niah
    and generate run the model itself with the compressed cache (`tasks.end_to_end`)."""
    sections = run_sections(cfg)
    check_environment(cfg)
    spec = sections["spec"]
    fitted = {s.rotation.fitted.sha256 for s in spec.sides().values() if s.rotation.fitted}
    extra = {"rotations_sha256": fitted.pop()} if fitted else {}
    with common.results_folder(cfg, "summary.json", common.tags(spec), extra) as (results, loggers):
        if loggers is not None and cfg.task == "eval":
            _test(cfg, sections, results, loggers)
        elif loggers is not None:
            from .end_to_end import run

            run(cfg, sections, results, loggers)
    summary = (
        json.loads((results / "summary.json").read_text()) if (results / "summary.json").is_file() else {}
    )
    overall = summary.get("overall", {})
    if overall:
        log.info("results in %s: %s", results, json.dumps({k: round(v, 5) for k, v in overall.items()}))
    return common.Outcome(results, overall)


def _test(cfg, sections, results, loggers) -> None:
    import torch

    from ..data.datamodule import KVDataModule
    from ..evaluate.module import AttentionEvalModule
    from ..kv.builder import CodecBank
    from ..results import write_results

    common.seed_lightning(cfg.seed)
    spec, settings = sections["spec"], sections["eval"]
    source = common.kv_source(cfg)
    arch = source.architecture
    layers = sections["store"]["layers"] or source.layers
    bank = CodecBank(spec, arch["head_dim"], common.calibration(cfg, spec, source))
    bank.check_units(layers, arch["num_kv_heads"])
    columns = {
        "task": "eval",
        "protocol": None,  # blocks replayed from a capture: no cache protocol
        "model": sections["model"]["name_or_path"],
        "data": sections["data"]["source"],
        "capture": source.manifest["fingerprint"][:16],
        **spec.columns(),
        "sink_tokens": sections["cache"]["sink_tokens"],
    }
    module = AttentionEvalModule(bank, columns, settings["top_k"], sections["cache"]["sink_tokens"])
    trainer = common.make_trainer(cfg, loggers)
    common.run_stage(
        trainer,
        "test",
        module,
        datamodule=KVDataModule(source, batch_size=settings["batch_size"], layers=layers),
        verbose=False,
    )
    units = [(layer, head) for layer in layers for head in range(arch["num_kv_heads"])]
    overall = module.summary(units)  # every process takes part: torchmetrics syncs the sums
    undefined = module.undefined()
    rows = module.rows
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rows)
        if not trainer.is_global_zero:  # an extra process of a multi-GPU run: rank 0 writes the results
            return
        rows = [r for part in gathered for r in part]
    for row in rows:
        row["document"] = source.document_of("test", row["sequence"])
    # K and V bytes one token costs over the evaluated layers and KV heads (exact sides at 16 bits)
    overall["kv_bytes_per_token"] = overall["kv_bits_per_coordinate"] * 2 * arch["head_dim"] * len(units) / 8
    summary = write_results(
        results, rows, {"overall": overall, "undefined": undefined, "columns": columns, "blocks": len(rows)}
    )
    common.log_results(loggers, rows, summary["overall"], metrics_logged=True)
