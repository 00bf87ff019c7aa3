"""Two real DDP processes (gloo on the CPU) reading shards through the datamodule.

Robust to a busy machine: generous but finite timeouts (the process group's and the test's), a free
port per run (conftest clears MASTER_PORT between tests) and one retry when another process took
that port between its choice and rank 0 binding it."""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from ldm.data.datamodule import ShardDataModule
from ldm.data.sources import SyntheticSource
from ldm.data.write import write_shards


class KeyRecorder(pl.LightningModule):
    """Trains a single weight and writes the sample keys each rank saw."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = {"train": [], "val": [], "train_steps": 0, "val_steps": 0}

    def training_step(self, batch, _):
        self.seen["train"] += batch["__key__"]
        self.seen["train_steps"] += 1
        return (self.w - batch["image"].mean()) ** 2

    def validation_step(self, batch, _):
        self.seen["val"] += batch["__key__"]
        self.seen["val_steps"] += 1
        # a synchronised log per step hangs if ranks disagree on the number of val steps
        self.log("val/x", batch["image"].mean(), sync_dist=True)

    def on_fit_end(self):
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _port_taken(err: BaseException) -> bool:
    return "EADDRINUSE" in str(err) or "address already in use" in str(err).lower()


def fit_on_two_ranks(make_trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """trainer.fit on two spawned ranks, once more on a new free port if the first one was taken
    (a port is chosen free in this process but bound only later, by rank 0)."""
    for attempt in range(2):
        try:
            make_trainer().fit(model, datamodule=datamodule)
            return
        except Exception as err:
            if attempt or not _port_taken(err):
                raise
            os.environ.pop("MASTER_PORT", None)  # Lightning pinned the taken one


def two_rank_trainer(**kwargs) -> pl.Trainer:
    # 3 minutes for any collective (torch's default, 30, would outlast the test's timeout)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(minutes=3))
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.timeout(300)  # about 15 s alone; spawning two ranks takes much longer on a loaded machine
def test_two_ranks_read_disjoint_samples_with_equal_steps(tmp_path):
    # uneven on purpose: 3 shards (10, 10, 7 samples) over 2 ranks -> 2 shards vs 1
    write_shards(SyntheticSource(27, 32, seed=0), tmp_path / "train", per_shard=10, progress=False)
    write_shards(SyntheticSource(11, 32, seed=9), tmp_path / "val", per_shard=4, progress=False)
    dm = ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=3,
                         num_workers=0, batches_per_epoch=5, shuffle_buffer=8)
    fit_on_two_ranks(lambda: two_rank_trainer(max_epochs=2), KeyRecorder(str(tmp_path)), dm)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["train_steps"] == r1["train_steps"] == 10  # 5 batches x 2 epochs on each rank
    # shards are split by rank: the two ranks never see the same sample
    assert not set(r0["train"]) & set(r1["train"])
    # validation: every rank reads floor(11 / 2) = 5 distinct samples per epoch, in equal steps
    assert r0["val_steps"] == r1["val_steps"]
    val0, val1 = set(r0["val"]), set(r1["val"])
    assert len(val0) == len(val1) == 5 and not val0 & val1
