"""What every LightningModule of the project shares: it can rebuild itself from its checkpoint."""
from __future__ import annotations

import pytorch_lightning as pl


class BuildableModule(pl.LightningModule):
    """Stores `build_config` (the resolved model config, set by the train CLI) in each checkpoint,
    so ldm.modules.loading can rebuild the module from the file alone."""

    build_config: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.build_config is not None:
            checkpoint["build_config"] = self.build_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.build_config = checkpoint.get("build_config", self.build_config)
