"""What a training step does with a NaN or infinite loss: stop with the step and the last good
checkpoint named, or skip the update and count it (config key `model.nonfinite_loss`)."""
from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.utils.run_checkpoints import checkpoint_info, checkpoints_in, last_good_checkpoint

POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss."""


def divergence_advice(module: pl.LightningModule) -> str:
    """Settings that keep a diverging run finite, for this module and run: gradient clipping where
    it is set (the trainer's under automatic optimisation, the autoencoders' own otherwise), skipping
    only on one process."""
    fixes = [f"lower model.base_lr (now {module.hparams.get('base_lr')})"]
    owner = "trainer" if module.automatic_optimization else "model"
    fixes.append(f"set {owner}.gradient_clip_val (e.g. 1.0)")
    if module.trainer.world_size == 1:
        fixes.append("set model.nonfinite_loss=skip to skip such batches")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]


class NonFiniteGuard:
    """Checks each training loss before the module steps its optimisers.

    policy: "stop" raises NonFiniteLossError naming the step and the checkpoint to resume from
        (see `resume_advice`); "skip" leaves the weights untouched for this batch and counts it
        (`skipped`, logged as train/nonfinite_skipped).
    All DDP ranks decide together: if any rank's loss is not finite, every rank stops, so no rank
    waits in a collective the others never enter. "skip" is refused with more than one process.
    """

    def __init__(self, policy: str = "stop"):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self._started: float | None = None  # when this process's first training step ran
        self._batch: int | None = None
        self._batch_step = 0  # the global step when the current batch began

    def usable(self, module: pl.LightningModule, loss: torch.Tensor, name: str = "loss") -> bool:
        """True when `loss` is finite on every rank; otherwise stop or (skip) count and return False."""
        trainer = module.trainer
        if self.policy == "skip" and trainer.world_size > 1:
            # A step without backward leaves DDP's gradient reduction unfinished, and the next
            # forward fails on every rank; skipping is therefore a single-process option.
            raise ValueError("model.nonfinite_loss=skip works on one device only (DDP needs a backward pass "
                             f"every step; this run has {trainer.world_size} processes): use "
                             "model.nonfinite_loss=stop and resume from the named checkpoint")
        if self._started is None:
            self._started = time.time()
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if batch != self._batch:  # the autoencoder checks two losses per batch, with a step between
            self._batch, self._batch_step = batch, trainer.global_step
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss).all()), all=True)
        if not finite:
            if self.policy == "stop":
                resume = self.resume_advice(trainer) if trainer.is_global_zero else "rank 0 names the checkpoint"
                raise NonFiniteLossError(
                    f"non-finite {name} ({loss.detach().float().mean().item()}) at step {trainer.global_step} "
                    f"(batch {batch - 1} of epoch {trainer.current_epoch}); {resume}. To keep it finite: "
                    f"{divergence_advice(module)}")
            self.skipped += 1
        module.log("train/nonfinite_skipped", float(self.skipped), batch_size=1)
        return finite

    def resume_advice(self, trainer: pl.Trainer) -> str:
        """Which checkpoint to resume from: the latest-step one saved before the weights that gave
        the non-finite loss, with all weights and optimiser states finite (loaded and checked),
        among those this process wrote and the one it resumed from. Earlier files in the folder
        are not considered: they may belong to a branch abandoned at an earlier divergence."""
        candidates = []
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath is not None and Path(checkpoint.dirpath).is_dir():
            candidates = [c for c in checkpoints_in(Path(checkpoint.dirpath)) if c.saved_at >= self._started]
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path is not None else None
        if resumed is not None and (info := checkpoint_info(resumed)) is not None:
            candidates.append(info)
        good = last_good_checkpoint(candidates, before_step=self._batch_step)
        if good is not None:
            return (f"the last good checkpoint is {good.path} (step {good.global_step}, from before the weights that "
                    f"gave this loss; its weights are finite): resume with ckpt_path={good.path}")
        if resumed is not None:
            return (f"no checkpoint with finite weights was saved before step {self._batch_step} (whose weights "
                    f"gave this loss) since the run resumed from {resumed}: resume from an earlier one")
        return (f"no checkpoint with finite weights was saved before step {self._batch_step} (whose weights gave "
                "this loss): start the run again")
