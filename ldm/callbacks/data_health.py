"""Keeps the samples the data pipeline skipped visible: counted in the logs, named in warnings."""
from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class DataHealth(pl.Callback):
    """Reads each training batch's `skipped` count and `skipped_where` notes (ldm.data.pipeline)
    and keeps them visible:

    - `data/skipped`: the samples skipped so far in the run, all ranks summed, logged with every
      training step (the ranks' counts are summed every trainer.log_every_n_steps batches and at
      the end of each epoch, so the value can lag that many batches behind);
    - a warning naming shards and samples, at the first skip and then at most once every
      `warn_interval_s` seconds on each rank, with the number skipped since the previous warning.

    The total is kept in checkpoints, so a resumed run goes on counting.
    """

    def __init__(self, warn_interval_s: float = 60.0):
        if warn_interval_s < 0:
            raise ValueError(f"warn_interval_s must be >= 0, got {warn_interval_s}")
        self.warn_interval_s = warn_interval_s
        self.skipped = 0  # this rank's skips in the run (on rank 0 also those before a resume)
        self.total = 0  # all ranks, as of the last sum
        self._batches = 0
        self._unwarned, self._examples, self._last_warning = 0, [], -math.inf

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a restored total belongs to rank 0 alone, or the sum over ranks would count it world_size times
        self.skipped = self.total if trainer.global_rank == 0 else 0
        self._batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not isinstance(batch, dict) or "skipped" not in batch:
            return
        n = int(batch["skipped"])
        if n:
            self.skipped += n
            self._unwarned += n
            self._examples = [*self._examples, *batch.get("skipped_where", ())][:3]
            self._warn(trainer)
        self._batches += 1
        if self._batches % trainer.log_every_n_steps == 0 or batch_idx + 1 == trainer.num_training_batches:
            # all ranks reach the same batches here (equal steps per rank): one sum per logging interval
            count = torch.tensor(float(self.skipped), device=pl_module.device)
            self.total = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        pl_module.log("data/skipped", float(self.total), on_step=True, on_epoch=False, batch_size=1)

    def _warn(self, trainer: pl.Trainer) -> None:
        now = time.monotonic()
        if now - self._last_warning < self.warn_interval_s:
            return
        rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
        log.warning("%sthe data pipeline skipped %d sample(s)%s: %s. The run goes on; the total is logged as "
                    "data/skipped (docs/data.md)", rank, self._unwarned,
                    "" if self._last_warning == -math.inf else " since the last warning", "; ".join(self._examples))
        self._unwarned, self._examples, self._last_warning = 0, [], now

    def state_dict(self) -> dict:
        return {"skipped": self.total}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total = int(state_dict["skipped"])
