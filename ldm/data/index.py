"""The small index file written beside a set of shards: shard names and sample counts.

Readers use it to know how many samples a split holds (so DDP ranks can agree on equal
validation lengths without a scan) and writers use it to resume an interrupted job.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_NAME = "index.json"


@dataclass
class ShardIndex:
    """What a writer produced: its settings and each finished shard's sample count."""

    settings: dict
    shards: dict[str, int] = field(default_factory=dict)  # file name -> samples
    classes: list[str] | None = None

    @property
    def total(self) -> int:
        return sum(self.shards.values())

    def save(self, folder: str | Path) -> None:
        """Write atomically, so a kill never leaves a half-written index."""
        path = Path(folder) / INDEX_NAME
        tmp = path.with_suffix(".json.tmp")
        data = {**asdict(self), "total": self.total}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: str | Path) -> "ShardIndex | None":
        """The index in `folder`, or None when there is none."""
        path = Path(folder) / INDEX_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(settings=data["settings"], shards=dict(data["shards"]), classes=data.get("classes"))


def shard_counts(urls: list[str]) -> dict[str, int]:
    """Samples per shard, from their folders' index files, for the local shards of `urls` that an
    index lists (remote, `pipe:` and unlisted shards are left out)."""
    counts: dict[str, int] = {}
    indices: dict[Path, ShardIndex | None] = {}
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            continue
        path = Path(url)
        if path.parent not in indices:
            indices[path.parent] = ShardIndex.load(path.parent)
        index = indices[path.parent]
        if index is not None and path.name in index.shards:
            counts[url] = index.shards[path.name]
    return counts


def count_from_index(urls: list[str]) -> int | None:
    """Samples in the local shards `urls` according to their folders' index files.

    None when any shard is remote, or not listed in an index (the caller then counts by reading).
    """
    counts = shard_counts(urls)
    if not all(url in counts for url in urls):
        return None
    return sum(counts[url] for url in urls)
