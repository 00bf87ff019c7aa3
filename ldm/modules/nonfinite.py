"""What a training step does with a NaN or infinite loss: stop with the step and the last good
checkpoint named, or skip the update and count it (config key `model.nonfinite_loss`)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss."""


class NonFiniteGuard:
    """Checks each training loss before the module steps its optimisers.

    policy: "stop" raises NonFiniteLossError naming the step and the last checkpoint written;
        "skip" leaves the weights untouched for this batch and counts it (`skipped`, logged as
        train/nonfinite_skipped).
    All DDP ranks decide together: if any rank's loss is not finite, every rank stops, so no rank
    waits in a collective the others never enter. "skip" is refused with more than one process.
    """

    def __init__(self, policy: str = "stop"):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0

    def usable(self, module: pl.LightningModule, loss: torch.Tensor, name: str = "loss") -> bool:
        """True when `loss` is finite on every rank; otherwise stop or (skip) count and return False."""
        trainer = module.trainer
        if self.policy == "skip" and trainer.world_size > 1:
            # A step without backward leaves DDP's gradient reduction unfinished, and the next
            # forward fails on every rank; skipping is therefore a single-process option.
            raise ValueError("model.nonfinite_loss=skip works on one device only (DDP needs a backward pass "
                             f"every step; this run has {trainer.world_size} processes): use "
                             "model.nonfinite_loss=stop and resume from the named checkpoint")
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss).all()), all=True)
        if not finite:
            if self.policy == "stop":
                ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
                resume = (f"the last good checkpoint is {ckpt} (resume with ckpt_path={ckpt})" if ckpt else
                          "no checkpoint was written yet")
                raise NonFiniteLossError(
                    f"non-finite {name} ({loss.detach().float().mean().item()}) at step {trainer.global_step} "
                    f"(batch {trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1} of epoch "
                    f"{trainer.current_epoch}); {resume}. Lower model.base_lr, enable "
                    "trainer.gradient_clip_val, or set model.nonfinite_loss=skip to skip such batches")
            self.skipped += 1
        module.log("train/nonfinite_skipped", float(self.skipped), batch_size=1)
        return finite
