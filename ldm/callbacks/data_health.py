"""Counts samples the data pipeline dropped as unreadable and keeps them visible in the logs."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn


class DataHealth(pl.Callback):
    """Sums each batch's `skipped` count (added by ldm.data.pipeline) and logs
    `data/skipped` (all ranks summed) at the end of every training epoch."""

    def __init__(self):
        self.skipped = 0
        self._warned = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, dict) and "skipped" in batch:
            n = int(batch["skipped"])
            self.skipped += n
            if n and not self._warned:
                rank_zero_warn(f"the data pipeline skipped {n} unreadable sample(s); the run continues "
                               "and the total is logged as data/skipped")
                self._warned = True

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log("data/skipped", float(self.skipped), reduce_fx="sum", sync_dist=True)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict["skipped"]
