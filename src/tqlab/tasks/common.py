"""What the train and evaluate tasks share: the KV source, loggers, the Lightning trainer, and the
content-addressed results folder."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import data_section
from ..kv.spec import KVQuantSpec

log = logging.getLogger("tqlab")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Where a run's results are, and its headline metrics (what a sweeper can optimise)."""

    folder: Path
    metrics: dict

    def objective(self, name: str | None) -> float | None:
        """The metric a Hydra sweeper optimises (`optimized_metric=`), or None when none is asked for."""
        if not name:
            return None
        if name not in self.metrics:
            raise KeyError(
                f"optimized_metric={name} is not a metric of this run; choose from {sorted(self.metrics)}"
            )
        return self.metrics[name]


def kv_source(cfg: DictConfig):
    """The KV source a run reads: synthetic KV, or the capture (made first when it is missing)."""
    data = data_section(cfg)
    if data["source"] == "synthetic":
        from ..data import SyntheticKV

        return SyntheticKV(**{k: v for k, v in data.items() if k != "source"})
    from ..capture.store import CaptureStore
    from .capture import capture

    return CaptureStore(capture(cfg), verify=False)  # capture() has just verified every shard


def calibration(cfg: DictConfig, spec: KVQuantSpec, source=None, sequences: int | None = None):
    """Train-split vectors for per-head statistics (fractional bits' outlier channels, `codec.center`'s mean,
    the query metric, transform coding, data-aware rotations): `fn(side, layer, head)`, or None when the spec
    needs none. They come from the first `sequences` (default `eval.calibration_sequences`) train sequences
    of the capture (made first when missing)."""
    if not spec.needs_calibration():
        return None
    import functools

    import torch

    source = source or kv_source(cfg)
    n = min(sequences or cfg.eval.calibration_sequences, source.num_sequences("train"))

    @functools.lru_cache(maxsize=64)  # a unit's key, value and query statistics come from one read
    def unit(layer: int, head: int) -> dict[str, torch.Tensor]:
        blocks = [source.load("train", layer, s, head) for s in range(n)]
        return {name: torch.cat([b[name].flatten(0, -2) for b in blocks]) for name in "qkv"}

    @functools.lru_cache(maxsize=64)
    def weights(layer: int, head: int) -> torch.Tensor:  # only codecs that rank by attention ask for these
        blocks = [source.load("train", layer, s, head) for s in range(n)]
        return torch.cat([attention_weights(b["q"], b["k"]) for b in blocks])

    def vectors(side: str, layer: int, head: int) -> torch.Tensor:
        """[n, head_dim] train-split keys or values of a KV head, or the queries of the heads that read it;
        side="weights": [n] per token Σ_q p_qt², aligned with the keys and values."""
        if side == "weights":
            return weights(layer, head)
        return unit(layer, head)[{"key": "k", "value": "v", "query": "q"}[side]]

    return vectors


def attention_weights(q, k):
    """Σ_q p_qt² per key token t of one sequence: q [G, T, d] (the query heads of a KV head), k [T, d], causal
    softmax at the usual 1/√d scale, in float64."""
    import torch

    t, d = k.shape
    logits = (q.double() @ k.double().T) / d**0.5
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool, device=k.device).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1).pow(2).sum((0, 1))


_USER_WANDB_DATA_DIR = os.environ.get("WANDB_DATA_DIR")


def _loggers(cfg: DictConfig, out: Path, tags: list[str]):
    """Instantiate the configured Lightning loggers into the run's output folder."""
    from hydra.utils import instantiate

    from ..runs import resolved, sweep_group

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        kwargs = {"save_dir": str(out)}
        if name == "wandb":
            Path(out, "wandb").mkdir(parents=True, exist_ok=True)
            # W&B stages the results table for upload in this run's folder, not under the home directory (per
            # run: a serial sweep's next run gets its own), unless the user chose a folder; its settings and
            # cache (a self-hosted server's address, logins) stay where the user has them
            if _USER_WANDB_DATA_DIR is None:
                os.environ["WANDB_DATA_DIR"] = str(Path(out, "wandb", "data"))
            # An explicit mode: Lightning's offline flag only sets WANDB_MODE, which wandb reads once per
            # process, so the second run of a serial sweep would otherwise try to log in.
            import wandb

            offline = node.get("offline", False)
            kwargs.update(
                group=node.get("group") or sweep_group() or cfg.task,
                tags=list(node.get("tags") or []) + tags,
                mode="offline" if offline else "online",
                resume=None,  # every run is new: a content-addressed folder is never logged twice
                # offline runs need no console chatter (their folder is the run's output folder); online
                # ones keep W&B's link and warnings but not the 30-line summary
                settings=wandb.Settings(silent=True) if offline else wandb.Settings(quiet=True),
            )
        loggers.append(instantiate(node, **kwargs))
    config = {k: v for k, v in resolved(cfg).items() if k != "hydra"}
    for lg in loggers:
        lg.log_hyperparams(config)
    return loggers


def log_results(loggers, rows: list[dict], overall: dict, metrics_logged: bool = False) -> None:
    """The results to the run's loggers: W&B gets the rows as a table and the overall means as its summary;
    the others the overall means as metrics, unless the Lightning module logged them (`metrics_logged`)."""
    finite = {k: v for k, v in overall.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key="results", columns=list(rows[0]), data=[[r[c] for c in rows[0]] for r in rows])
            lg.experiment.summary.update(finite)
        elif not metrics_logged:
            lg.log_metrics(finite)
            lg.save()


def _finish(loggers) -> None:
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        from ..wandb_run import finish_wandb

        finish_wandb()


class _DropNoise(logging.Filter):
    """Lightning's advertisement and accelerator roll call say nothing about the run."""

    NOISE = ("💡 Tip:", "TPU available", "HPU available", "\nDetected KeyboardInterrupt")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def seed_lightning(seed: int) -> None:
    """Quiet Lightning's logging (before its first line), then seed every generator."""
    import warnings

    import lightning as L

    if logging.getLogger().hasHandlers():  # Hydra prints every record already: one line per event
        logging.getLogger("lightning").handlers.clear()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if not any(isinstance(f, _DropNoise) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_DropNoise())
    # raised inside Lightning for torch's own API change; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    L.seed_everything(seed, workers=True, verbose=False)


def make_trainer(cfg: DictConfig, loggers, callbacks=(), **overrides):
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


def run_stage(trainer, stage: str, *args, **kwargs):
    """`trainer.fit/validate/test(...)`, with Ctrl-C raised as KeyboardInterrupt: Lightning turns it into
    `sys.exit(1)`, which would end the app before the run could say it is resumable."""
    try:
        return getattr(trainer, stage)(*args, **kwargs)
    except SystemExit as exit_:
        if trainer.interrupted:
            raise KeyboardInterrupt from exit_
        raise


def tags(spec: KVQuantSpec) -> list[str]:
    return [
        f"{k}={v}"
        for k, v in spec.columns().items()
        if k in ("codec", "kv", "k_bits", "v_bits", "k_rotation", "v_rotation") and v is not None
    ]


@contextlib.contextmanager
def results_folder(cfg: DictConfig, finished: str, run_tags: list[str], extra: dict | None = None):
    """Claim the run's content-addressed results folder and yield (folder, loggers); loggers is None when
    the folder already holds `finished` (the run is done and is skipped)."""
    from ..runs import claim, fingerprint, link_result, output_dir

    out = output_dir(cfg)
    results = Path(cfg.results_root).expanduser().resolve() / cfg.task / fingerprint(cfg, extra)[:16]
    with claim(results):
        link_result(out, results)
        if (results / finished).is_file():
            log.info(
                "already %s in %s: nothing to do",
                "trained" if cfg.task == "train" else "evaluated",
                results,
            )
            yield results, None
            return
        OmegaConf.save(cfg, results / "config.yaml", resolve=True)
        loggers = _loggers(cfg, out, run_tags)
        try:
            yield results, loggers
        finally:
            _finish(loggers)
