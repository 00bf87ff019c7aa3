"""Learning-rate scaling, made explicit (the reference multiplies silently), and warm-up / decay factors."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

LR_SCHEDULES = ("constant", "cosine")


def effective_lr(base_lr: float, scale_lr: bool, batch_size: int, world_size: int = 1, accumulate: int = 1) -> float:
    """base_lr x batch x GPUs x accumulation when `scale_lr` (the reference's rule), else base_lr.
    GPUs counts every process of every node (num_nodes x devices)."""
    return base_lr * batch_size * world_size * accumulate if scale_lr else base_lr


def trainer_effective_lr(module: pl.LightningModule, base_lr: float, scale_lr: bool,
                         accumulate: int | None = None) -> float:
    """effective_lr with batch size, world size (nodes x devices) and accumulation taken from the
    running trainer (`accumulate`: a module that accumulates itself, under manual optimisation). Recorded in the module's hparams (and so in every checkpoint and the loggers'
    hyper-parameters) as `effective_lr` with the formula as `lr_scaling`, and logged as the metric
    `lr/effective` (the LR monitor's `lr-*` also follows warm-up)."""
    trainer = module.trainer
    datamodule = trainer.datamodule
    batch = getattr(datamodule, "batch_size", 1) if datamodule is not None else 1
    nodes, world = trainer.num_nodes, trainer.world_size
    accumulate = trainer.accumulate_grad_batches if accumulate is None else accumulate
    lr = effective_lr(base_lr, scale_lr, batch, world, accumulate)
    module.hparams["effective_lr"] = lr
    module.hparams["lr_scaling"] = (f"{base_lr} x {batch} batch x {world} GPUs ({nodes} nodes x {world // nodes}) x "
                                    f"{accumulate} accumulation" if scale_lr else "none")
    for logger in trainer.loggers:
        # hparams_initial, which Lightning sends to the loggers, predates these two entries
        logger.log_hyperparams({key: module.hparams[key] for key in ("effective_lr", "lr_scaling")})
        logger.log_metrics({"lr/effective": lr}, step=trainer.global_step)
    return lr


def lr_factor(step: int, warmup: int, total: int | None = None, schedule: str = "constant") -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based): a linear warm-up over
    `warmup` steps, then 1 (`constant`) or a cosine decay that reaches 0 at step `total` (`cosine`)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {LR_SCHEDULES}")
    if schedule == "cosine" and (total is None or total <= warmup):
        raise ValueError(f"a cosine lr schedule needs a total step count above the warm-up ({warmup}), got {total}: "
                         "set trainer.max_steps")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int | None = None,
                     schedule: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR of lr_factor(step, warmup, total, schedule). LambdaLR evaluates step 0
    at once, so a cosine decay without `total` is refused here, before training starts."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule))
