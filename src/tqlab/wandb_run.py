"""Ending a W&B run so that what it logged is on disk when the caller returns."""

from __future__ import annotations


def finish_wandb() -> None:
    """Finish the current run and wait for W&B's service to write it out.

    `wandb.finish()` returns before the service has flushed the run's record file (an offline run read
    right after it can hold only its header); `wandb.teardown()` is W&B's documented way to wait for all
    data to be written. The next run starts a fresh service."""
    import wandb

    wandb.finish()
    wandb.teardown()
