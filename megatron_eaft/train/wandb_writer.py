"""Weights & Biases next to TensorBoard: the same scalar keys, one W&B run per job (last rank).

wandb is the ``wandb`` extra, imported only when ``logging.wandb_project`` is set (the
configuration checks that it is installed before anything starts).
"""

from __future__ import annotations

from typing import Any


class WandbWriter:
    """``log(scalars, step)`` into a W&B run made from ``logging.wandb_*``."""

    def __init__(self, config: Any) -> None:
        import wandb

        settings = config.logging
        self.run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity,
            name=settings.wandb_run_name,
            # None leaves the mode to WANDB_MODE / `wandb offline`, as W&B users expect.
            mode="offline" if settings.wandb_offline else None,
            config=config.to_dict(),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
