"""The ranks of an evaluation that a launcher started as several processes (torchrun, srun).

The launcher's environment is read with Lightning's cluster environments, as train.py's Trainer
reads it: torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) first, so torchrun inside a
SLURM allocation takes its own ranks, then those of srun's tasks (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the first node of SLURM_NODELIST). One process, one SLURM task, or a batch script
run without srun is rank 0 of 1 and starts no process group.

The group is gloo on every device: the ranks exchange only a few small objects (their output
folder, settings, rank 0's word), never tensors (the samples' features travel through the chunk
files of ldm.evaluation.chunks), so NCCL would add nothing.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from ldm.utils.device import resolve_device

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the evaluation's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_zero(self) -> bool:
        """Whether this is global rank 0 (the one that computes and writes the results)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order (picklable objects)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every rank unless all ranks hold the same `value`; `what` names it in the error."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            listing = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RuntimeError(f"the ranks disagree on {what} ({listing})")

    def on_zero(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 while the others wait; an error there is raised on every rank (so none
        waits for a rank that has stopped). Returns fn's result on rank 0, None elsewhere."""
        result, error = None, None
        if self.is_zero:
            try:
                result = fn()
            except Exception as err:  # reported to the others, then raised here
                error = err
        word = [None if error is None else f"{type(error).__name__}: {error}"]
        if self.world > 1:
            dist.broadcast_object_list(word, src=0)
        if error is not None:
            raise error
        if word[0] is not None:
            raise RuntimeError(f"rank 0 stopped: {word[0]}")
        return result

    def close(self) -> None:
        """Leave the process group (a no-op for one process)."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launch_environment() -> TorchElasticEnvironment | SLURMEnvironment | None:
    """The environment of the launcher that started this process as one of several ranks, else None."""
    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    elif "SLURM_NTASKS" in os.environ and SLURMEnvironment.detect():  # (detect() warns outside SLURM jobs)
        if "SLURM_STEP_ID" not in os.environ:  # the batch script itself, not one of srun's tasks
            if int(os.environ["SLURM_NTASKS"]) > 1:
                log.warning("SLURM_NTASKS=%s but this process was not started by srun: it evaluates alone (prepend "
                            "srun to share the work over the allocation's tasks)", os.environ["SLURM_NTASKS"])
            return None
        env = SLURMEnvironment()  # refuses --ntasks without --ntasks-per-node
    else:
        return None
    return env if env.world_size() > 1 else None


def start_ranks(timeout_s: float) -> Ranks:
    """Join the launcher's ranks (a gloo process group in which no rank waits longer than
    `timeout_s` for the others), or Ranks() for a single process."""
    env = launch_environment()
    if env is None:
        return Ranks()
    # env:// reads these; SLURM's come from the node list and the job id (Lightning's rule)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
    ranks = Ranks(env.global_rank(), env.world_size(), env.local_rank())
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=timedelta(seconds=timeout_s))
    return ranks


def rank_device(name: str, ranks: Ranks) -> torch.device:
    """The device of this rank for `device=` (auto | cpu | cuda | cuda:K): with several ranks,
    'auto' and 'cuda' mean the GPU of the local rank, and a fixed GPU index is refused."""
    if ranks.world > 1 and name != "auto":
        fixed = torch.device(name)
        if fixed.type == "cuda" and fixed.index is not None:
            raise ValueError(f"device={name} under a launcher with {ranks.world} ranks: every rank would use that "
                             "one GPU; pass device=auto (or cuda): rank r then uses the GPU of its local rank")
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if ranks.world > 1:
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise ValueError(f"rank {ranks.rank} is local rank {ranks.local_rank} of its node, which has {count} "
                             "GPU(s): start at most one process per GPU (--nproc-per-node / --ntasks-per-node)")
        device = torch.device("cuda", ranks.local_rank)
    if device.index is not None:
        torch.cuda.set_device(device)
    return device
