"""Learning-rate scaling, made explicit (the reference multiplies silently)."""
from __future__ import annotations

import pytorch_lightning as pl


def effective_lr(base_lr: float, scale_lr: bool, batch_size: int, world_size: int = 1, accumulate: int = 1) -> float:
    """base_lr x batch x GPUs x accumulation when `scale_lr` (the reference's rule), else base_lr."""
    return base_lr * batch_size * world_size * accumulate if scale_lr else base_lr


def trainer_effective_lr(module: pl.LightningModule, base_lr: float, scale_lr: bool) -> float:
    """effective_lr with batch size, world size and accumulation taken from the running trainer,
    recorded in the module's hparams (and so in every checkpoint) as `effective_lr`."""
    trainer = module.trainer
    batch = getattr(trainer.datamodule, "batch_size", 1) if trainer.datamodule is not None else 1
    lr = effective_lr(base_lr, scale_lr, batch, trainer.world_size, trainer.accumulate_grad_batches)
    module.hparams["effective_lr"] = lr
    module.hparams["lr_scaling"] = (f"{base_lr} x {batch} batch x {trainer.world_size} GPUs x "
                                    f"{trainer.accumulate_grad_batches} accumulation" if scale_lr else "none")
    return lr
