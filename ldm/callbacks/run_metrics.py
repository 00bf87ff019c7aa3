"""metrics.json: a finished run's final step and scalar metrics, for scripts and tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's last logged scalar metrics (callback_metrics) as plain floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1}


class RunMetrics(pl.Callback):
    """Write `path` (rank 0) when fit ends: {"global_step": ..., <metric>: <value>, ...}.

    Written inside the training process, because a spawned DDP run (trainer=ddp_cpu) hands back
    only the metrics to the calling process, not the trainer's step counter."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"global_step": trainer.global_step, **scalar_metrics(trainer)}, indent=1))
