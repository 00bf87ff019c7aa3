"""A run resumed in its folder continues its CSV log at the step it resumes from: what an earlier
attempt logged from that step on (after its last checkpoint, before it stopped) is replaced."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ldm.utils.loggers import AppendingCSVLogger


class ResumedLogs(pl.Callback):
    """Tells the run's AppendingCSVLogger, as the first training batch starts, the step Lightning
    logs that batch at (only then known: Lightning sets it when the epoch loop restarts)."""

    def __init__(self):
        self._started = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._started:
            return
        self._started = True
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step of this batch's logs
        for logger in trainer.loggers:
            if isinstance(logger, AppendingCSVLogger):
                logger.replace_from(step)
