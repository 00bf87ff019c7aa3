"""Stop cleanly on SIGTERM / SIGUSR1 with checkpoints/last.ckpt written, and requeue under SLURM.

Lightning already turns SIGTERM into a clean stop: its handler only sets a flag, and the loop
raises SIGTERMException (a SystemExit, exit code 0) at the next batch boundary on all ranks.
This callback adds the checkpoint at that boundary (atomically, through the trainer's
CheckpointIO), so `ckpt_path=last` continues exactly there.

SIGUSR1 is what SLURM sends ahead of a time limit (`#SBATCH --signal=USR1@120`). Lightning's own
SLURM handler saves an hpc_ckpt_*.ckpt inside the signal handler, i.e. in the middle of a training
step, which cannot resume exactly; here SIGUSR1 is routed through the same SIGTERM path instead,
and once last.ckpt is written rank 0 runs `scontrol requeue <job>`. The requeued job runs the same
command, so it must name the run folder (hydra.run.dir) and pass ckpt_path=last.
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

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this job (array jobs: <array job>_<task>), or None."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(pl.Callback):
    """On SIGTERM or SIGUSR1: finish the current batch, save last.ckpt, exit with code 0.

    requeue: after a SIGUSR1 under SLURM, requeue the job (rank 0 runs `scontrol requeue`).
    """

    def __init__(self, requeue: bool = True):
        self.requeue = requeue
        self._usr1 = False
        self._previous_usr1: signal.Handlers | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Registered before the Trainer installs its handlers, so Lightning's SLURM SIGUSR1
        # handler (a mid-step save) stays out.
        if stage == "fit" and hasattr(signal, "SIGUSR1"):
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        self._usr1 = True
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop at the next batch boundary

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = save_last(trainer)
        if path is None:
            log.warning("stopped by a signal at step %d without a ModelCheckpoint: nothing saved", trainer.global_step)
        else:
            log.info("stopped by a signal at step %d; saved %s", trainer.global_step, path)
        job = slurm_job_id()
        if self._usr1 and self.requeue and job is not None and trainer.is_global_zero:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                log.info("requeued SLURM job %s", job)
            else:
                log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
