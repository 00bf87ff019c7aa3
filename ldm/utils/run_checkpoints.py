"""The checkpoints of a run folder: when each was written and which step it holds, the newest one
(what `ckpt_path=last` resumes), and the newest one that is safe to resume after a divergence."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SAVED_AT = "saved_at"  # checkpoint key: when the file was written (time.time() on rank 0)


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint file is, when it was written and the global step it holds."""

    path: Path
    saved_at: float
    global_step: int


def _load(path: Path) -> dict[str, Any]:
    # memory-mapped: reading the step does not read the tensors
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_info(path: Path) -> CheckpointInfo | None:
    """A checkpoint's write time (`saved_at`; for files without it, the file's modification time)
    and global step, read without reading its tensors; None (with a warning) for a file that
    cannot be read as a checkpoint (truncated, foreign, gone)."""
    try:
        checkpoint = _load(path)
        saved_at = checkpoint.get(SAVED_AT)
        return CheckpointInfo(path, float(saved_at) if saved_at is not None else os.path.getmtime(path),
                              int(checkpoint.get("global_step", 0)))
    except Exception as err:  # noqa: BLE001 - an unreadable file is skipped, never fatal
        log.warning("skipping %s, which cannot be read as a checkpoint: %s", path, err)
        return None


def checkpoints_in(folder: Path) -> list[CheckpointInfo]:
    """Every readable *.ckpt in `folder` (last, periodic, best)."""
    return [info for path in sorted(folder.glob("*.ckpt")) if (info := checkpoint_info(path)) is not None]


def newest_checkpoint(folder: Path) -> CheckpointInfo | None:
    """The checkpoint in `folder` written last, or None.

    By write time rather than global step: a run resumed in its folder from an older checkpoint
    (after a divergence) continues its new branch, not the abandoned one's later steps. A later
    step written earlier is named in a warning.
    """
    found = checkpoints_in(folder)
    if not found:
        return None
    # last.ckpt first among files written at the same moment
    newest = max(found, key=lambda c: (c.saved_at, c.path.name == "last.ckpt"))
    later = [c for c in found if c.global_step > newest.global_step]
    if later:
        top = max(later, key=lambda c: c.global_step)
        log.warning("%s holds a later step (%d) than the newest checkpoint %s (step %d) but was written "
                    "before it (a branch abandoned by resuming from an older checkpoint?); pass ckpt_path=%s "
                    "to continue from it instead", top.path, top.global_step, newest.path, newest.global_step,
                    top.path)
    return newest


def _all_finite(obj: Any) -> bool:
    """True when every floating-point tensor in a (nested) checkpoint object is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def is_finite_checkpoint(path: Path) -> bool:
    """True when the weights and optimiser states in checkpoint `path` are all finite."""
    checkpoint = _load(path)
    return _all_finite(checkpoint.get("state_dict", {})) and _all_finite(checkpoint.get("optimizer_states", []))


def last_good_checkpoint(candidates: Iterable[CheckpointInfo], before_step: int) -> CheckpointInfo | None:
    """The checkpoint to resume from after a non-finite loss computed with the weights of step
    `before_step`: the latest-step one of `candidates` saved before that step whose weights and
    optimiser states are all finite (each file is loaded and checked), or None."""
    for info in sorted((c for c in candidates if c.global_step < before_step),
                       key=lambda c: (c.global_step, c.saved_at), reverse=True):
        try:
            if is_finite_checkpoint(info.path):
                return info
            log.warning("%s (step %d) holds non-finite weights or optimiser states", info.path, info.global_step)
        except Exception as err:  # noqa: BLE001 - gone or unreadable: not a checkpoint to name
            log.warning("skipping %s, which cannot be read as a checkpoint: %s", info.path, err)
    return None
