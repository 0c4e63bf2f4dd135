"""train.py's task: fit learned rotations on the train split, validating each epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import registry
from ..config import ConfigError, check_environment, run_sections
from . import common

log = logging.getLogger("tqlab")


def train(cfg: DictConfig) -> common.Outcome:
    """Fit learned rotations; returns the results folder and the best and initial validation loss."""
    from ..runs import fingerprint, output_dir, results_of

    if cfg.get("resume"):
        resume = results_of(cfg.resume).resolve()
        if not (resume / "config.yaml").is_file():
            raise ConfigError(
                f"resume={cfg.resume}: no config.yaml there; pass a train run or results folder"
            )
        saved = OmegaConf.load(resume / "config.yaml")
        if fingerprint(cfg) != fingerprint(OmegaConf.merge(saved, {"resume": cfg.resume})):
            log.warning(
                "resume=%s continues that run with its saved configuration; other settings given are ignored",
                cfg.resume,
            )
        saved.output_dir = str(output_dir(cfg))
        # its results_root may be relative to where it was first started: continue this very folder instead
        saved.results_root = str(resume.parents[1])
        if resume != resume.parents[1] / "train" / fingerprint(saved)[:16]:
            raise ConfigError(
                f"resume={cfg.resume}: {resume} is not the results folder of the train run its config.yaml "
                "describes (moved, renamed or edited?); pass a folder a train run wrote, as it wrote it"
            )
        cfg = saved
    per_side = [f"{key}={cfg.get(key)}" for key in ("k_codec", "v_codec") if cfg.get(key) is not None]
    if per_side:  # the fitted file names one codec, which eval.py then checks the rotations against
        raise ConfigError(
            f"{', '.join(per_side)}: train.py fits rotations for one codec on every side (codec=...); a codec per "
            "side is evaluated with eval.py (with fixed rotations, or rotations fitted for that codec)"
        )
    sections = run_sections(cfg)
    check_environment(cfg)
    spec = sections["spec"]
    fixed = [
        f"{side}: {s.rotation.name}"
        for side, s in spec.sides().items()
        if not registry.rotation_is_learned(s.rotation.name)
        and not registry.rotation_is_data_aware(s.rotation.name)
    ]
    if fixed:
        raise ConfigError(
            f"rotation={cfg.rotation.name} has nothing to fit; train.py fits rotation=block_so8_learned, "
            "hadamard_block_so8_learned, triality or the data-aware eigen_hadamard(_butterfly, _dense, "
            "_triality). Evaluate fixed rotations with eval.py"
        )
    with common.results_folder(cfg, "done.json", common.tags(spec)) as (results, loggers):
        if loggers is not None:
            _fit(cfg, sections, results, loggers)
    done = json.loads((results / "done.json").read_text()) if (results / "done.json").is_file() else {}
    log.info(
        "rotations saved in %s (best.safetensors); evaluate them with: python eval.py rotations=%s %s",
        results,
        results,
        _eval_overrides(cfg),
    )
    metrics = {k: done[k] for k in ("best_val_loss", "val_loss_initial") if done.get(k) is not None}
    return common.Outcome(results, metrics)


def _eval_overrides(cfg: DictConfig, choices: dict | None = None) -> str:
    """The eval.py overrides that evaluate the fitted rotations as they were fitted: what eval.py checks
    against them (codec, bits, centering, model) and the data they were fitted on. `choices`: Hydra's config
    group choices (read from Hydra when it runs the app)."""
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    parts = [
        f"kv={'full_kv' if len(cfg.kv.compress) == 2 else cfg.kv.compress[0] + '_only'}",
        f"bits={cfg.bits}",
    ]
    parts += [f"{k}={cfg[k]}" for k in ("k_bits", "v_bits") if cfg.get(k) is not None]
    if cfg.codec.name != "turboquant_mse":
        parts.append(f"codec={cfg.codec.name}")
    if cfg.codec.get("center"):
        parts.append("codec.center=true")
    # model and data where they differ from the shared defaults (conf/common/run.yaml): the group as chosen,
    # and a folder, hub id or text file as given
    model = choices.get("model")
    if model not in (None, "smollm2_135m"):
        parts.append(f"model={model}")
    if model == "hf" or (model is None and cfg.model.name_or_path != "smollm2-135m"):
        parts.append(f"model.name_or_path={cfg.model.name_or_path}")
    if cfg.store.get("layers") is not None:  # the fitted layers only
        parts.append(f"store.layers=[{','.join(map(str, cfg.store.layers))}]")
    data = choices.get("data") or cfg.data.source
    if data != "wiki":
        parts.append(f"data={data}")
    if cfg.data.get("path") is not None:
        parts.append(f"data.path={cfg.data.path}")
    return " ".join(parts)


def _fit(cfg, sections, results: Path, loggers) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    from ..fit.module import RotationFitModule, SaveRotations
    from ..fit.state import EpochShuffled, load_state, write_atomic
    from ..kv.builder import fit_means, fit_rotations
    from ..rotation.io import save_rotations
    from ..runs import resolved

    common.seed_lightning(cfg.seed)
    spec, fit = sections["spec"], sections["fit"]
    source = common.kv_source(cfg)
    arch = source.architecture
    layers = sections["store"]["layers"] or source.layers
    train_vectors = common.calibration(cfg, spec, source, source.num_sequences("train"))
    means = fit_means(spec, layers, arch["num_kv_heads"], fit["per_head"], train_vectors)
    rotations = fit_rotations(
        spec, layers, arch["num_kv_heads"], arch["head_dim"], fit["per_head"], train_vectors, means
    )
    fit_bits = {side: s.codec.stage1_bits for side, s in spec.sides().items()}
    module = RotationFitModule(
        rotations, fit_bits, fit["objective"], fit["per_head"], fit["lr"], fit["temperature"], means
    )
    side = next(iter(spec.sides().values()))
    facts = {
        "rotation": side.rotation.name,
        "rotation_options": dict(side.rotation.options),
        "dim": arch["head_dim"],
        "fit_bits": fit_bits,
        "codec": side.codec.name,
        "bits": {s: (getattr(spec, s).codec.bits if getattr(spec, s) else None) for s in registry.SIDES},
        "model": sections["model"]["name_or_path"],
        "objective": fit["objective"],
        "center": {
            s: dict(side_spec.codec.options).get("center", False) for s, side_spec in spec.sides().items()
        },
        "per_head": fit["per_head"],
        "layers": layers,
        "model_layers": arch[
            "num_layers"
        ],  # so that eval.py knows, before loading, what store.layers=null means
        "capture": source.manifest["fingerprint"],
        "config": resolved(cfg),
    }
    data = EpochShuffled(source, cfg.seed, batch_size=fit["batch_size"], layers=layers)
    if not any(p.requires_grad for p in module.parameters()):  # statistics only: nothing to train
        validated = common.run_stage(common.make_trainer(cfg, loggers), "validate", module, datamodule=data)
        val = float(validated[0]["val_loss"])
        for name in ("best", "last"):
            save_rotations(
                results / f"{name}.safetensors", module.rotations(), {**facts, "epoch": 0, "val_loss": val}
            )
        summary = {
            "epochs_done": 0,
            "best_val_loss": val,
            "last_val_loss": val,
            "val_loss_initial": val,
            **facts,
        }
        write_atomic(results / "done.json", json.dumps(summary, indent=2, default=str).encode())
        return
    saved = load_state(results)  # an interrupted run: SaveRotations restores it when the fit starts
    if saved is None:
        validator = common.make_trainer(cfg, loggers)
        validated = common.run_stage(validator, "validate", module, datamodule=data, verbose=False)
        state, tensors = {"val_loss_initial": float(validated[0]["val_loss"])}, None
    else:
        state, tensors = saved
        log.info(
            "resuming %s after %d epochs (best val_loss %.5f)",
            results,
            state["epochs_done"],
            state["best_val_loss"],
        )
    saver = SaveRotations(results, facts, state, tensors)
    # EarlyStopping checks on validation end, before SaveRotations saves its state there
    stopping = EarlyStopping("val_loss", patience=fit["patience"], check_on_train_epoch_end=False)
    trainer = common.make_trainer(cfg, loggers, [stopping, saver], max_epochs=fit["max_epochs"])
    if state.get("epochs_done", 0) < fit["max_epochs"] and not state.get("stopped"):
        common.run_stage(trainer, "fit", module, datamodule=data)  # Ctrl-C: resumable, not done
    if trainer.is_global_zero:
        losses = ("epochs_done", "best_val_loss", "last_val_loss", "val_loss_initial")
        summary = {**{k: saver.state.get(k) for k in losses}, **facts}
        write_atomic(results / "done.json", json.dumps(summary, indent=2, default=str).encode())
