"""An evaluation's output folder holds the per-image rows of its images in chunk files, so a
killed evaluation continues where it stopped and many ranks share the work.

    <out>/chunks/settings.json   what the chunks are made with; a later launch with other settings is refused
    <out>/chunks/<part>-<k>.pt   chunk k of a part (`real`: the real images, `samples`: the generated or
                                 scored ones): torch.save of a dict of tensors and lists, written atomically
    <out>/chunks/<part>.done     the part's number of chunks, written once all of them exist

A part's inputs come in the same order on every rank (chunk k is its k-th batch), and rank r makes
the chunks k = r, r + world, ... that are not on disk yet. So the chunks, and the images in them,
do not depend on the number of ranks: an evaluation stopped on 8 GPUs may continue on 2, and no
finished chunk is made twice (a chunk cut off by the kill is made again, whole).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from ldm.evaluation.distributed import Ranks
from ldm.utils.checkpoint_io import atomic_torch_save

T = TypeVar("T")


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, sort_keys=True))


class ChunkStore:
    """The chunk files below `<out_dir>/chunks`."""

    def __init__(self, out_dir: str | Path):
        self.folder = Path(out_dir) / "chunks"

    def adopt_settings(self, settings: dict[str, Any]) -> int:
        """Write `settings` for a new folder, or check that an earlier launch used the same ones
        (refused otherwise: its chunks would mix with these). Returns the chunks found on disk."""
        path = self.folder / "settings.json"
        settings = _normalised(settings)
        if path.is_file():
            before = json.loads(path.read_text())
            keys = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if keys:
                detail = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in keys)
                raise ValueError(f"{self.folder.parent} holds chunks of an evaluation with other settings ({detail}). "
                                 "Continue it with its own settings, or evaluate into a new folder "
                                 "(hydra.run.dir=<new folder>)")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
            os.replace(tmp, path)
        return len(list(self.folder.glob("*-*.pt")))

    def path(self, part: str, index: int) -> Path:
        """The file of chunk `index` of `part`."""
        return self.folder / f"{part}-{index:06d}.pt"

    def has(self, part: str, index: int) -> bool:
        """Whether chunk `index` of `part` is on disk (complete: files appear only whole)."""
        return self.path(part, index).is_file()

    def save(self, part: str, index: int, record: dict[str, Any]) -> None:
        """Write a chunk (tensors are moved to the CPU) atomically."""
        atomic_torch_save(_to_cpu(record), self.path(part, index))

    def completed(self, part: str) -> int | None:
        """The chunk count of `part` if an earlier launch finished it, else None."""
        marker = self.folder / f"{part}.done"
        return int(marker.read_text()) if marker.is_file() else None

    def finish(self, part: str, count: int) -> None:
        """Check that all `count` chunks of `part` exist, then mark it finished (and remove what
        killed writes left)."""
        missing = [self.path(part, i).name for i in range(count) if not self.has(part, i)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {count} {part} chunks are not in {self.folder} (e.g. {missing[0]}) although "
                "every rank has finished: the ranks of other nodes wrote them to a folder this node does not see. "
                "Put the output folder (hydra.run.dir) on a filesystem shared by all nodes; the launch can then be "
                "repeated, and it makes only the missing chunks")
        (self.folder / f"{part}.done").write_text(str(count))
        for leftover in self.folder.glob(f".{part}-*.tmp"):  # half-written by a rank that was killed
            leftover.unlink(missing_ok=True)

    def records(self, part: str, count: int) -> Iterator[dict[str, Any]]:
        """The chunks of `part` in order."""
        for index in range(count):
            yield torch.load(self.path(part, index), map_location="cpu", weights_only=True)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def run_part(store: ChunkStore, part: str, inputs: Iterable[T], work: Callable[[T], dict[str, Any]], ranks: Ranks,
             bar: tqdm | None = None, size: Callable[[T], int] = lambda item: 1) -> int:
    """Make this rank's missing chunks of `part`: `work(input)` of every `ranks.world`-th input,
    starting at `ranks.rank`. Returns the part's number of chunks (its inputs are not read again
    when an earlier launch finished it). `bar` advances by `size(input)` for every input passed,
    whoever makes its chunk."""
    count = store.completed(part)
    if count is not None:
        return count
    count = 0
    for index, item in enumerate(inputs):
        count += 1
        if index % ranks.world == ranks.rank and not store.has(part, index):
            store.save(part, index, work(item))
        if bar is not None:
            bar.update(size(item))
    return count
