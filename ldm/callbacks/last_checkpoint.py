"""checkpoints/last.ckpt as the run's newest state at every moment (ldm.utils.run_checkpoints
finds the newest checkpoint of a folder for `ckpt_path=last`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.utils.run_checkpoints import SAVED_AT


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (periodic step*.ckpt files) with one last.ckpt that always holds
    the newest state of the run:

    - one file: Lightning writes last-v1.ckpt, last-v2.ckpt, ... beside a last.ckpt it did not
      write in this process (every resumed run), leaving last.ckpt behind; here it is overwritten;
    - rewritten with each periodic save, when training ends (Lightning writes it then only if this
      process saved nothing) and on demand (`save_last_now`, the pre-emption stop);
    - every checkpoint written while this callback is registered records when (`saved_at`), by
      which `newest_checkpoint` orders a folder's files.
    """

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # Lightning keeps the name only when it is `last_model_path`; set it, so it never versions.
        self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def save_last_now(self, trainer: pl.Trainer) -> Path | None:
        """Write last.ckpt now (every rank takes part; rank 0 writes, atomically through the
        trainer's CheckpointIO). None when save_last is off."""
        if not self.save_last:
            return None
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return Path(self.last_model_path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Always, not only when nothing was saved: `ckpt_path=last` with a larger trainer.max_steps
        # or max_epochs then extends a finished run from its final step. fast_dev_run: no saves,
        # as for Lightning's own.
        if not trainer.fast_dev_run:
            self.save_last_now(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[SAVED_AT] = time.time()


def save_last(trainer: pl.Trainer) -> Path | None:
    """Write the run's last.ckpt now through its RunCheckpoint; None when it has none (or its
    save_last is off)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, RunCheckpoint):
            return callback.save_last_now(trainer)
    return None
