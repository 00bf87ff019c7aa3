"""Start-up of a run whose ranks a launcher starts all at once (torchrun, srun): the checks that fail
early, and one rank preparing what the others read.

A training run writes a few things before it trains: the synthetic shards, the latent cache, the
caption tokenizer (built with the model). Global rank 0 writes them, once, into the run and data
folders, which must be on a filesystem every node sees (the checkpoints are written there by rank
0 too); every other rank waits for it, then reads them.

With Lightning's own launcher (`python train.py trainer=ddp`, spawn) rank 0 prepares before it
starts the other processes, so nothing here is needed. Under torchrun and srun every rank runs
train.py from the start: a gloo group made before `fit` (in Lightning's process group, which
`fit` then reuses) carries rank 0's word that it is done, or its error, and each wait is bounded.
Nothing is left on disk between launches, so no marker of an earlier launch can be mistaken for
this one's.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch.distributed as dist
from lightning_fabric.plugins.environments import LightningEnvironment

MARKER_PREFIX = ".launch-"  # rank 0's file in the run folder that the other ranks must see


def ranks_start_together(trainer: pl.Trainer) -> bool:
    """Whether every rank runs train.py from its start (torchrun, srun, MPI): a launcher outside
    Lightning made the processes. Lightning's own launcher (LightningEnvironment) starts the other
    ranks from inside rank 0's `fit`, after rank 0 has prepared everything."""
    env = getattr(trainer.strategy, "cluster_environment", None)  # single-device strategies have none
    return (trainer.world_size > 1 and env is not None and env.creates_processes_externally
            and not isinstance(env, LightningEnvironment))


def start_group(trainer: pl.Trainer, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group over all ranks for the start-up, with waits bounded by `timeout_s`. It opens
    the strategy's own process group first (Lightning's `fit` finds it open and keeps it)."""
    trainer.strategy.setup_environment()
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _where() -> str:
    return f"rank {dist.get_rank()} on {socket.gethostname()} (pid {os.getpid()})"


def _gather(group: dist.ProcessGroup, value) -> list:
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def check_same_run_folder(group: dist.ProcessGroup, out: Path) -> None:
    """Every rank must write into the same run folder (a Hydra run dir made from the time, or a
    relative path on nodes with different working folders, differs between ranks)."""
    folders = _gather(group, (str(out.resolve()), _where()))
    if len({folder for folder, _ in folders}) > 1:
        listing = "; ".join(f"{where}: {folder}" for folder, where in folders)
        raise RuntimeError(f"the ranks of this launch write into different run folders ({listing}). Pass the same "
                           "absolute hydra.run.dir=<folder on a shared filesystem> to every node's command")


TRAINING_SHARES = ("Rank 0 alone writes checkpoints, the tokenizer and the latent cache there; put hydra.run.dir "
                   "(and paths.data_dir) on a shared filesystem")


def check_shared_run_folder(group: dist.ProcessGroup, out: Path, timeout_s: float, shares: str = TRAINING_SHARES
                            ) -> None:
    """Rank 0 writes a file named for this launch into the run folder; every rank must see it within
    `timeout_s` (network filesystems may show a new file late), else the run folder is not shared
    and the other nodes would miss rank 0's checkpoints, tokenizer and latent cache. `shares`: what
    the error says the ranks share there, and what to do."""
    name = [None]
    if dist.get_rank() == 0:
        name[0] = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
        (out / name[0]).write_text(_where())
    dist.broadcast_object_list(name, src=0, group=group)
    marker = out / name[0]
    deadline = time.monotonic() + timeout_s
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = _gather(group, (marker.is_file(), _where()))
    if dist.get_rank() == 0:
        marker.unlink()
    blind = [where for ok, where in seen if not ok]
    if blind:
        raise RuntimeError(f"{', '.join(blind)} cannot see {marker}, which rank 0 wrote {timeout_s:g} s earlier: the "
                           f"run folder is not on a filesystem shared by all nodes. {shares}")


@contextmanager
def rank_zero_first(group: dist.ProcessGroup | None, is_global_zero: bool, timeout_s: float) -> Iterator[bool]:
    """`with rank_zero_first(group, trainer.is_global_zero, t) as first:` runs the block on global
    rank 0 first (`first` is True there: prepare, then build) while every other rank waits, at most
    `timeout_s`, for its outcome before running the block itself (`first` False: build only). A
    failure on rank 0 stops every rank with rank 0's error.

    group None: no other rank is running yet (one process, or Lightning's own launcher, which
    starts the others later): the block just runs.
    """
    if group is None:
        yield is_global_zero
        return
    if is_global_zero:
        try:
            yield True
        except BaseException as err:
            dist.broadcast_object_list([f"{type(err).__name__}: {err}"], src=0, group=group)
            raise
        dist.broadcast_object_list([None], src=0, group=group)
        return
    outcome: list = ["no word"]
    start = time.monotonic()
    try:
        dist.broadcast_object_list(outcome, src=0, group=group)
    except RuntimeError as err:  # gloo: timed out, or rank 0's process went away
        raise TimeoutError(f"{_where()} waited {time.monotonic() - start:.0f} s for global rank 0 to prepare the run "
                           f"(synthetic data, latent cache, tokenizer) and heard nothing ({err}). See rank 0's log; "
                           f"if preparing takes longer than launch.prepare_timeout_s={timeout_s:g}, raise it or "
                           "prepare the data beforehand (python -m ldm.data.write / ldm.cli.encode_latents)") from err
    if outcome[0] is not None:
        raise RuntimeError(f"global rank 0 failed while preparing the run: {outcome[0]}")
    yield False
