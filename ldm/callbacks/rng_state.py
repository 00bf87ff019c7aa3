"""Global RNG states in checkpoints, so a resumed run draws the same noise as an uninterrupted one.

Lightning saves model, optimiser, scheduler, loop and data-loader states but not the RNGs
(torch, CUDA, numpy, python random). This callback adds every rank's states to the checkpoint
(gathered to rank 0, which writes the file) and puts them back just before the first resumed
training batch. It also runs validation on a fork of the RNGs, so how often a run validates (and
whether a resumed run repeats a validation) never changes the training stream.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist


def collect_rng_states() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states, as tensors and plain Python
    values only (loadable with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states from collect_rng_states()."""
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather(obj: Any, world_size: int) -> list[Any]:
    """`obj` from every rank (a one-element list without a process group)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class RNGStateCheckpoint(pl.Callback):
    """Saves the global RNG states of all ranks and restores each rank's on resume."""

    def __init__(self):
        self._to_restore: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank (only rank 0 writes it): gather here.
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        # Saved during validation (a SIGTERM there): the training stream is the one set aside.
        states = self._outside_validation if self._outside_validation is not None else collect_rng_states()
        return {"per_rank": _gather(states, world)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        per_rank = state_dict["per_rank"]
        if rank >= len(per_rank):
            raise RuntimeError(f"the checkpoint holds RNG states for {len(per_rank)} rank(s), this is rank {rank}: "
                               "resume with the same number of processes (or start a new run from its weights)")
        self._to_restore = per_rank[rank]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not at load time: the loops and loaders are set up by now, so nothing between this
        # point and the first training step draws from the restored streams.
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._outside_validation = collect_rng_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outside_validation is not None:
            set_rng_states(self._outside_validation)
            self._outside_validation = None
