"""The work behind the command-line apps, as plain functions of a config (no Hydra inside).

Tests compose a config and call these directly; `capture.py` and friends are thin `@hydra.main` wrappers.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, check_head_dim, data_section, model_section, store_section

log = logging.getLogger(__name__)


def capture(cfg: DictConfig) -> Path:
    """Create, resume or reuse the capture that `cfg` describes; returns its folder."""
    model, data, settings = model_section(cfg), data_section(cfg), store_section(cfg)
    if data["source"] == "synthetic":
        raise ConfigError(
            "data=synthetic is generated on the fly and needs no capture; pick data=wiki or another text"
        )
    from .capture.run import capture_spec, run_capture

    spec = capture_spec(model, data, settings["layers"], settings["dtype"], settings["shard_size"])
    root = Path(settings["root"]).expanduser().resolve()
    return run_capture(spec, root, device=model.get("device", "cpu"), progress=cfg.get("progress", True))


def kv_source(cfg: DictConfig):
    """The KV source a run reads: synthetic KV, or the capture (made first when it is missing)."""
    data = data_section(cfg)
    if data["source"] == "synthetic":
        from .data import SyntheticKV

        return SyntheticKV(**{k: v for k, v in data.items() if k != "source"})
    from .capture.store import CaptureStore

    return CaptureStore(capture(cfg))


# -- train / eval ----------------------------------------------------------------------------------------
def _loggers(cfg: DictConfig, out: Path, tags: list[str]):
    """Instantiate the configured Lightning loggers into the run's output folder."""
    from hydra.utils import instantiate

    from .runs import resolved, sweep_group

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        kwargs = {"save_dir": str(out)}
        if name == "wandb":
            Path(out, "wandb").mkdir(parents=True, exist_ok=True)
            # An explicit mode: Lightning's offline flag only sets WANDB_MODE, which wandb reads once per
            # process, so the second run of a serial sweep would otherwise try to log in.
            kwargs.update(
                group=node.get("group") or sweep_group() or cfg.task,
                tags=list(node.get("tags") or []) + tags,
                mode="offline" if node.get("offline", False) else "online",
            )
        loggers.append(instantiate(node, **kwargs))
    config = {k: v for k, v in resolved(cfg).items() if k != "hydra"}
    for lg in loggers:
        lg.log_hyperparams(config)
    return loggers


def _finish(loggers) -> None:
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        from .wandb_run import finish_wandb

        finish_wandb()


def _trainer(cfg: DictConfig, loggers, callbacks=(), **overrides):
    import lightning as L

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    return L.Trainer(
        **kwargs,
        logger=loggers or False,
        callbacks=list(callbacks),
        enable_checkpointing=False,  # rotations are saved as safetensors by SaveRotations, never pickled
        enable_progress_bar=bool(cfg.get("progress", True)),
        enable_model_summary=False,
        log_every_n_steps=1,
    )


@contextlib.contextmanager
def _results_folder(cfg: DictConfig, task: str, finished: str, tags: list[str], extra: dict | None = None):
    """Claim the run's content-addressed results folder and yield (folder, loggers); loggers is None when
    the folder already holds `finished` (the run is done and is skipped)."""
    from .runs import claim, fingerprint, link_result, output_dir

    out = output_dir(cfg)
    results = Path(cfg.results_root).expanduser().resolve() / task / fingerprint(cfg, extra)[:16]
    with claim(results):
        link_result(out, results)
        if (results / finished).is_file():
            log.info(
                "already %s in %s: nothing to do", {"train": "trained", "eval": "evaluated"}[task], results
            )
            yield results, None
            return
        OmegaConf.save(cfg, results / "config.yaml", resolve=True)
        loggers = _loggers(cfg, out, tags)
        try:
            yield results, loggers
        finally:
            _finish(loggers)


def _tags(sections: dict) -> list[str]:
    rot = sections["rotation"]
    return [f"rotation={rot['name']}", f"codec={sections['codec']['name']}", f"bits={sections['bits']}"]


def train(cfg: DictConfig) -> Path:
    """Fit learned rotations on the train split (validating each epoch); returns the results folder."""
    from .config import fit_section, run_sections
    from .runs import output_dir, results_of

    if cfg.get("resume"):
        resume = results_of(cfg.resume)
        if not (resume / "config.yaml").is_file():
            raise ConfigError(
                f"resume={cfg.resume}: no config.yaml there; pass a train run or results folder"
            )
        saved = OmegaConf.load(resume / "config.yaml")
        saved.output_dir = str(output_dir(cfg))
        cfg = saved
    sections, fit = run_sections(cfg), fit_section(cfg)
    rot = sections["rotation"]
    if not rot["learned"]:
        raise ConfigError(
            f"rotation={rot['name']} has nothing to fit; train.py fits rotation=block_so8_learned, "
            "hadamard_block_so8_learned or triality. Evaluate fixed rotations with eval.py"
        )
    with _results_folder(cfg, "train", "done.json", _tags(sections)) as (results, loggers):
        if loggers is not None:
            _fit(cfg, sections, fit, results, loggers)
    log.info("rotations saved in %s (best.safetensors)", results)
    return results


def _fit(cfg, sections, fit, results: Path, loggers) -> None:
    import json

    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from .data.datamodule import KVDataModule
    from .fit.module import RotationFitModule, SaveRotations
    from .rotation.io import load_rotations
    from .runs import resolved

    L.seed_everything(cfg.seed, workers=True)
    source = kv_source(cfg)
    arch = source.architecture
    check_head_dim(sections["rotation"]["name"], arch["head_dim"])
    layers = sections["store"]["layers"] or source.layers
    prod = sections["codec"]["name"] == "turboquant_prod"
    fit_bits = {t: b - 1 if prod else b for t, b in sections["bits"].items() if b is not None}
    rot = sections["rotation"]
    options = {"view": rot["view"], "init": rot["init"]}
    module = RotationFitModule(
        layers,
        arch["num_kv_heads"],
        arch["head_dim"],
        fit_bits,
        rot["name"],
        options,
        fit["objective"],
        fit["per_head"],
        fit["lr"],
        cfg.seed,
    )
    state_file, best, done = results / "fit_state.json", float("inf"), 0
    if state_file.is_file():  # an interrupted run: continue from its last rotations
        state = json.loads(state_file.read_text())
        best, done = state["best_val_loss"], state["epochs_done"]
        fitted, _ = load_rotations(results / "last.safetensors")
        for unit, r in fitted.items():
            module.codecs[unit].rotation.load_state_dict(r.state_dict())
        log.info("resuming %s after %d epochs (best val_loss %.5f)", results, done, best)
    facts = {
        "rotation": rot["name"],
        "rotation_options": options,
        "dim": arch["head_dim"],
        "fit_bits": fit_bits,
        "codec": sections["codec"]["name"],
        "bits": sections["bits"],
        "objective": fit["objective"],
        "per_head": fit["per_head"],
        "layers": layers,
        "capture": source.manifest["fingerprint"],
        "config": resolved(cfg),
    }
    data = KVDataModule(source, batch_size=fit["batch_size"], layers=layers, shuffle=True)
    remaining = max(0, cfg.trainer.max_epochs - done)
    callbacks = [
        SaveRotations(results, facts, best, done),
        EarlyStopping("val_loss", patience=fit["patience"]),
    ]
    trainer = _trainer(cfg, loggers, callbacks, max_epochs=remaining)
    initial = None
    if done == 0:
        initial = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"])
    if remaining:
        trainer = _trainer(cfg, loggers, callbacks, max_epochs=remaining)
        trainer.fit(module, datamodule=data)
        if trainer.interrupted:  # Lightning returns normally on Ctrl-C: leave the run resumable, not done
            raise KeyboardInterrupt(f"training interrupted; re-run the same command to resume {results}")
    if trainer.is_global_zero:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        summary = {**state, "val_loss_initial": initial, **facts}
        (results / "done.json").write_text(json.dumps(summary, indent=2, default=str))


def evaluate(cfg: DictConfig) -> Path:
    """Attention quality of the configured compressed cache on the test split; returns the results folder."""
    import json

    from .config import run_sections
    from .runs import results_of

    sections = run_sections(cfg)
    fitted_file, extra = None, {}
    if cfg.get("rotations"):
        fitted_file = results_of(cfg.rotations) / "best.safetensors"
        if not fitted_file.is_file():
            raise ConfigError(
                f"rotations={cfg.rotations}: no best.safetensors there; pass a finished train run folder"
            )
        from .capture.models import sha256_file

        extra["rotations_sha256"] = sha256_file(fitted_file)
    with _results_folder(cfg, "eval", "summary.json", _tags(sections), extra) as (results, loggers):
        if loggers is None:
            return results
        summary, rows = _test(cfg, sections, fitted_file, loggers)
        if rows is None:  # an extra process of a multi-GPU run: rank 0 writes the results
            return results
        _write_results(results, rows, summary, loggers)
    log.info(
        "results in %s: %s", results, json.dumps({k: round(v, 5) for k, v in summary["overall"].items()})
    )
    return results


def _test(cfg, sections, fitted_file, loggers):
    import lightning as L
    import torch

    from .data.datamodule import KVDataModule
    from .evaluate.codecs import CodecBank
    from .evaluate.module import AttentionEvalModule
    from .rotation.io import load_rotations

    L.seed_everything(cfg.seed, workers=True)
    source = kv_source(cfg)
    arch = source.architecture
    check_head_dim(sections["rotation"]["name"], arch["head_dim"])
    fitted = None
    if fitted_file is not None:
        fitted, facts = load_rotations(fitted_file)
        if facts["dim"] != arch["head_dim"]:
            raise ConfigError(
                f"rotations={cfg.rotations} were fitted for head_dim {facts['dim']}, this capture has {arch['head_dim']}"
            )
    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    n_cal = min(settings["calibration_sequences"], source.num_sequences("train"))

    def calibration(target: str, layer: int, head: int) -> torch.Tensor:
        key = "k" if target == "key" else "v"
        return torch.cat([source.load("train", layer, s, head)[key] for s in range(n_cal)])

    bank = CodecBank(
        sections["codec"],
        sections["bits"],
        sections["rotation"],
        arch["head_dim"],
        cfg.seed,
        fitted,
        calibration,
    )
    rotation, view = sections["rotation"]["name"], sections["rotation"].get("view")
    if fitted:
        rotation, view = "fitted:" + facts["rotation"], facts["rotation_options"].get("view")
    columns = {
        "model": sections["model"]["name_or_path"],
        "data": sections["data"]["source"],
        "capture": source.manifest["fingerprint"][:16],
        "codec": sections["codec"]["name"],
        "rotation": rotation,
        "view": view,
        "rotations_from": str(cfg.rotations) if fitted else None,
        "kv": "+".join(t for t, b in sections["bits"].items() if b is not None),
        "k_bits": sections["bits"]["key"],
        "v_bits": sections["bits"]["value"],
        "seed": cfg.seed,
    }
    module = AttentionEvalModule(bank, columns, settings["top_k"])
    layers = sections["store"]["layers"] or source.layers
    trainer = _trainer(cfg, loggers, use_distributed_sampler=False)
    trainer.test(
        module,
        datamodule=KVDataModule(source, batch_size=settings["batch_size"], layers=layers),
        verbose=False,
    )
    rows = module.rows
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part] if trainer.is_global_zero else None
    units = [(layer, head) for layer in layers for head in range(arch["num_kv_heads"])]
    overall = module.summary(units)
    # K and V bytes one token costs over the evaluated layers and KV heads (exact sides at 16 bits)
    overall["kv_bytes_per_token"] = overall["kv_bits_per_coordinate"] * 2 * arch["head_dim"] * len(units) / 8
    summary = {
        "overall": overall,
        "columns": columns,
        "blocks": len(rows) if rows is not None else None,
    }
    return summary, rows


def _write_results(results: Path, rows: list[dict], summary: dict, loggers) -> None:
    import csv
    import json
    import math

    rows = sorted(rows, key=lambda r: (r["layer"], r["kv_head"], r["sequence"]))
    with open(results / "results.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metric_names = [k for k in summary["overall"] if k in rows[0]]

    def means_by(key) -> dict:
        groups: dict = {}
        for r in rows:
            groups.setdefault(key(r), []).append(r)
        return {g: {m: _nanmean([r[m] for r in block]) for m in metric_names} for g, block in groups.items()}

    per_layer = means_by(lambda r: r["layer"])
    per_head = means_by(lambda r: f"{r['layer']}.{r['kv_head']}")  # "layer.kv_head"
    summary = {**summary, "per_layer": per_layer, "per_head": per_head}
    (results / "results.csv.tmp").rename(results / "results.csv")
    (results / "summary.json.tmp").write_text(json.dumps(summary, indent=2, default=str))
    (results / "summary.json.tmp").rename(results / "summary.json")  # written last: marks the run finished
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key="results", columns=list(rows[0]), data=[[r[c] for c in rows[0]] for r in rows])
            lg.experiment.summary.update({k: v for k, v in summary["overall"].items() if not math.isnan(v)})


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def report(cfg: DictConfig) -> Path:
    """report.md (+ figures, report.json, W&B) for the evaluations under cfg.runs; returns report.md."""
    import sys

    from .config import to_dict
    from .report.build import build_report
    from .runs import output_dir

    settings = to_dict(cfg, "wandb") if cfg.get("wandb") else {"mode": "disabled"}
    command = (
        "python report.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("report.py") else ""
    )
    runs = OmegaConf.to_container(cfg.runs) if OmegaConf.is_list(cfg.runs) else cfg.runs
    return build_report(runs, output_dir(cfg), list(cfg.metrics), cfg.reference, command, settings)
