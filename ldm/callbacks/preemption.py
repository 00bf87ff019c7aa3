"""Stop cleanly on SIGTERM / SIGUSR1 with checkpoints/last.ckpt written, and requeue under SLURM.

The signal handler only notes the signal. At the end of every training batch all ranks agree
whether any of them got one (one boolean all-reduce); if so every rank takes part in writing
last.ckpt (atomically, through the trainer's CheckpointIO), and the run ends with exit code 0
(Lightning's SIGTERMException, a SystemExit) at the next hook that would start more work (the
next batch, a validation, the epoch end): raised after Lightning logged that batch, so its metrics
row is written too. `ckpt_path=last` continues exactly there.

A SIGUSR1 can come before the callback exists (SLURM's `--signal` warning during start-up, while
the latent cache is encoded): train.py calls `ldm.utils.early_signals.hold_early_sigusr1()` first thing, which only notes
it, and the callback acts on it after the first batch instead of Python's default (the process
ending without a checkpoint or a requeue).

Why not Lightning's own handling: its SIGTERM handler broadcasts from inside the handler, and its
SLURM SIGUSR1 handler saves there, in the middle of a step. A signal reaches the ranks of a job at
slightly different moments, so one rank ran that broadcast (or save) while another was inside a
different collective of the training step, and 2-task SLURM jobs hung on `scancel --signal=USR1`.
The handlers here are installed at setup (before Lightning's, which then leaves SIGUSR1 alone)
and again when training starts (after Lightning registered its SIGTERM handler, which they
replace); Lightning restores the original handlers when fit ends.

SIGUSR1 is what SLURM sends ahead of a time limit (`#SBATCH --signal=USR1@120`). After a SIGUSR1
under SLURM, once last.ckpt is written, rank 0 runs `scontrol requeue <job>`. The requeued job
runs the same command, so it must name the run folder (hydra.run.dir) and pass ckpt_path=last.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.callbacks.last_checkpoint import save_last
from ldm.utils.early_signals import take_early_signals

log = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this job (array jobs: <array job>_<task>), or None."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(pl.Callback):
    """On SIGTERM or SIGUSR1: every rank finishes its current batch, last.ckpt is saved, exit code 0.

    requeue: after a SIGUSR1 under SLURM, requeue the job (rank 0 runs `scontrol requeue`).
    """

    def __init__(self, requeue: bool = True):
        self.requeue = requeue
        self._received: set[int] = set()
        self._stopping = False  # last.ckpt written: end the run at the next hook that starts work
        self._before: dict[int, object] = {}  # the handlers before fit, put back after it

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.add(signum)  # only noted: acted on at the next batch end, by all ranks together

    def _install(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._received = take_early_signals()
            self._stopping = False
            self._before = {signum: signal.getsignal(signum) for signum in SIGNALS}
            self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(bool(self._received), all=False):
            return
        usr1 = strategy.reduce_boolean_decision(getattr(signal, "SIGUSR1", None) in self._received, all=False)
        path = save_last(trainer)
        if path is None:
            log.warning("stopped by a signal at step %d without a ModelCheckpoint: nothing saved", trainer.global_step)
        else:
            log.info("stopped by a signal at step %d; saved %s", trainer.global_step, path)
        job = slurm_job_id()
        if usr1 and self.requeue and job is not None and trainer.is_global_zero:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                log.info("requeued SLURM job %s", job)
            else:
                log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        self._stopping = True  # not raised here: Lightning logs this batch's metrics after this hook

    def _stop_if_saved(self) -> None:
        if self._stopping:
            raise SIGTERMException()  # Lightning ends the fit; the process exits with code 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved()
