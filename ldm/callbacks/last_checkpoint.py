"""checkpoints/last.ckpt written on demand and when training ends."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


def save_last(trainer: pl.Trainer) -> Path | None:
    """Write the checkpoint callback's last.ckpt now (every rank takes part; rank 0 writes,
    atomically through the trainer's CheckpointIO). None when there is no ModelCheckpoint."""
    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
        return None
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    trainer.save_checkpoint(path)
    return path


class FinalCheckpoint(pl.Callback):
    """Write last.ckpt when training ends, so it always holds the final step (ModelCheckpoint
    writes it only with its periodic saves) and `ckpt_path=last` with a larger trainer.max_steps
    or max_epochs extends a finished run."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_last(trainer)
