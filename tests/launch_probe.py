"""A callback that train.py runs under the real launchers (tests/test_launchers.py, tests/test_fsdp.py
pass it as +callbacks.probe): each rank writes what it was, what it read and what it wrote.

    +callbacks.probe._target_=launch_probe.Probe +callbacks.probe.out=<folder>

<folder>/rank<global rank>.json: ranks and sizes as Lightning sees them, the sample keys of
every training batch with its epoch, the global step at the start (a resumed run starts late),
scale_factor, the checkpoint files this rank wrote, and the per-step training loss.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytorch_lightning as pl


class Probe(pl.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict = {"batches": [], "losses": [], "checkpoints_written": []}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint
        written = self.record["checkpoints_written"]

        def counting_save(checkpoint, path, storage_options=None):  # only the ranks that really write get here
            written.append(str(path))
            return save(checkpoint, path, storage_options)

        io.save_checkpoint = counting_save

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record.update(global_rank=trainer.global_rank, local_rank=trainer.local_rank,
                           node_rank=trainer.node_rank, world_size=trainer.world_size, num_nodes=trainer.num_nodes,
                           devices=trainer.num_devices, start_step=trainer.global_step, host=socket.gethostname(),
                           pid=os.getpid(), env={k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK",
                                                                              "SLURM_PROCID", "SLURM_JOB_ID",
                                                                              "SLURM_RESTART_COUNT")})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["batches"].append({"epoch": trainer.current_epoch, "keys": list(batch["__key__"])})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train/loss")
        self.record["losses"].append(None if loss is None else float(loss))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every on_train_end: Lightning runs checkpoint callbacks last, and the final
        # last.ckpt is written in RunCheckpoint's.
        scale = getattr(pl_module, "scale_factor", None)
        self.record["scale_factor"] = None if scale is None else float(scale)
        self.record["end_step"] = trainer.global_step
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class Slow(pl.Callback):
    """Sleeps `seconds` after every training batch of a job's first attempt (SLURM_RESTART_COUNT
    unset or 0), so that a signal timed by SLURM finds it still training."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
            time.sleep(self.seconds)
