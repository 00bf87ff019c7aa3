"""Streaming batches from WebDataset shards, the same way on one CPU or many DDP ranks.

Training streams are infinite and sliced into a fixed number of batches per rank and epoch, so
every rank takes the same number of optimiser steps whatever the shard sizes (uneven shards
never hang or crash a run). Validation streams read every sample exactly once, split across
ranks at the sample level and truncated to an equal count per rank.

Rank and world size are passed in explicitly (the datamodule takes them from the Trainer);
workers are found with torch.utils.data.get_worker_info(). All randomness is seeded from
(seed, epoch, rank, worker), so a stream is reproducible, and a training stream can restart
mid-epoch exactly where it stopped (EpochLoader.state_dict, saved in Lightning checkpoints).
"""
from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.index import ShardIndex, count_from_index
from ldm.data.tar import tar_samples
from ldm.data.transforms import ImageTransform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
# A latent cache sample (ldm.data.latents) holds first-stage moments in place of the image.
MOMENTS_KEY = "moments.npy"


def has_payload(raw: dict) -> bool:
    """Whether a raw sample holds an image or cached first-stage moments."""
    return MOMENTS_KEY in raw or any(k in raw for k in IMAGE_KEYS)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern, a '::'-separated list, a list, or a folder with an
    index.json (its shards in order). `pipe:` and remote URLs pass through unchanged."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            path = Path(part)
            if "://" not in part and not part.startswith("pipe:") and path.is_dir():
                index = ShardIndex.load(path)
                if index is None:
                    raise FileNotFoundError(f"{path} is a folder without index.json; pass shard files or a brace pattern")
                out.extend(str(path / name) for name in sorted(index.shards))
            else:
                out.extend(braceexpand(part))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    local_missing = [u for u in out if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if local_missing:
        raise FileNotFoundError(f"{len(local_missing)} shard(s) not found, e.g. {local_missing[0]}; "
                                "write them with `python -m ldm.data.write` or fix data.*_urls")
    return out


def count_samples(urls: list[str]) -> int:
    """Number of samples with an image (or cached moments) in `urls` (index files first, else a scan)."""
    counted = count_from_index(urls)
    if counted is not None:
        return counted
    stream = tar_samples(({"url": u} for u in urls), wds.warn_and_continue)
    return sum(1 for s in stream if has_payload(s))


@dataclass
class SkipCounter:
    """Samples dropped since the last emitted one (attached to the next batch as `skipped`)."""

    pending: int = 0

    def count(self) -> None:
        self.pending += 1

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler (unreadable tar member or stream): count, continue."""
        self.count()
        return True

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


@dataclass
class SampleDecoder:
    """Raw tar members -> a training sample dict (image tensor, caption, class label).

    Latent cache samples (`moments.npy`, no image, see ldm.data.latents) give `moments` (the
    stored tensor) and `__url__` (their shard, so a mismatch error can name the cache) instead.
    `extra_keys` maps batch keys to member extensions decoded by type: json -> object,
    txt -> str, cls -> int, npy -> tensor; e.g. {meta: json} for the metadata, which no model
    reads and is therefore not decoded unless asked for.
    """

    transform: ImageTransform
    extra_keys: dict[str, str] = field(default_factory=dict)

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None and MOMENTS_KEY not in raw:
            raise ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')} has no image member "
                             f"(nor the {MOMENTS_KEY} of a latent cache)")
        sample: dict = {}
        if key is not None:
            sample["image"] = self.transform.decode(raw[key], rng)
        if MOMENTS_KEY in raw:
            sample["moments"] = _decode_member("npy", raw[MOMENTS_KEY])
            sample["__url__"] = raw.get("__url__", "")
        sample.update({
            "caption": raw["txt"].decode("utf-8").strip() if "txt" in raw else "",
            "class_label": int(raw["cls"]) if "cls" in raw else -1,
            "__key__": raw["__key__"],
        })
        for name, ext in self.extra_keys.items():
            if ext not in raw:
                raise KeyError(f"sample {raw['__key__']} lacks member .{ext} (data.extra_keys.{name})")
            sample[name] = _decode_member(ext, raw[ext])
        return sample


def _decode_member(ext: str, data: bytes):
    if ext.endswith("json"):
        return json.loads(data)
    if ext.endswith("txt"):
        return data.decode("utf-8")
    if ext.endswith("cls"):
        return int(data)
    if ext.endswith("npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    return data


def collate(samples: list[dict], skipped: int) -> dict:
    """Stack a list of sample dicts into a batch dict."""
    batch: dict = {"skipped": skipped}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif key == "class_label":
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


class ShardStream(IterableDataset):
    """Batches from WebDataset shards for one DDP rank.

    train=True: an endless stream (shards split across ranks and workers, or resampled with
    replacement), shuffled through a buffer of raw samples before decoding, cut to
    `batches_per_epoch` batches per rank and epoch.
    train=False: every sample once; rank r takes samples r, r + world, ...; each rank gets
    floor(N / world) samples so all ranks run the same number of validation steps.
    """

    def __init__(self, urls: str | list[str], batch_size: int, decoder: SampleDecoder, *, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, batches_per_epoch: int | None = None,
                 shuffle_buffer: int = 1000, resampled: bool = False, max_samples: int | None = None,
                 batch_transforms: list[Callable[[dict], dict]] | None = None):
        self.urls = expand_urls(urls)
        self.batch_transforms = list(batch_transforms or [])
        if train and not batches_per_epoch:
            raise ValueError("a training stream needs batches_per_epoch (data.batches_per_epoch) > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batch_size, self.decoder, self.train = batch_size, decoder, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch, self.shuffle_buffer, self.resampled = batches_per_epoch, shuffle_buffer, resampled
        self.epoch = 0
        self.resume_batches = 0  # batches of this epoch (this rank, all workers) already consumed
        self.samples_per_rank = None
        if not train:
            total = count_samples(self.urls)
            if max_samples is not None:
                total = min(total, max_samples)
            self.samples_per_rank = total // world_size
            if self.samples_per_rank == 0:
                raise ValueError(f"validation set of {total} samples is smaller than the {world_size} ranks")

    def __len__(self) -> int:
        if self.train:
            return self.batches_per_epoch
        return (self.samples_per_rank + self.batch_size - 1) // self.batch_size

    def _worker(self) -> tuple[int, int]:
        """(this worker's role, workers). The DataLoader takes batches from workers 0, 1, ... in
        turn from the start of each pass; a pass resumed after `resume_batches` must continue with
        the worker that was next, so worker i plays worker (i + resume_batches) % n."""
        info = get_worker_info()
        return (0, 1) if info is None else ((info.id + self.resume_batches) % info.num_workers, info.num_workers)

    def seed_for(self, *salt: int) -> int:
        """A 64-bit seed from (seed, epoch, rank, *salt)."""
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank, *salt]).generate_state(2)
        return int(state[0]) << 32 | int(state[1])

    def _rng(self, *salt: int) -> random.Random:
        return random.Random(self.seed_for(*salt))

    def _train_shards(self, worker: int, n_workers: int) -> Iterator[dict]:
        rng = self._rng(worker, 0)
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.urls)}
        mine = self.urls[self.rank::self.world_size][worker::n_workers]
        if not mine:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {self.world_size} rank(s) x {n_workers} "
                "worker(s): write more, smaller shards (--per-shard), use fewer data.num_workers, "
                "or set data.resampled=true")
        while True:  # endless passes over this worker's shards, reshuffled each pass
            order = list(mine)
            rng.shuffle(order)
            yield from ({"url": u} for u in order)

    def _collate(self, samples: list[dict], skipped: int) -> dict:
        batch = collate(samples, skipped)
        for transform in self.batch_transforms:  # e.g. SR / inpainting degradations, in the workers
            batch = transform(batch)
        return batch

    def _sample_lists(self, samples: Iterator[dict], rng: random.Random, counter: SkipCounter) -> Iterator[list[dict]]:
        """Decoded samples grouped into batch-sized lists (the last one may be shorter)."""
        batch: list[dict] = []
        for raw in samples:
            try:
                sample = self.decoder(raw, rng)
            except Exception:  # an undecodable sample is skipped and counted, never fatal
                counter.count()
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _batches(self, samples: Iterator[dict], counter: SkipCounter, rng: random.Random) -> Iterator[dict]:
        for batch in self._sample_lists(samples, rng, counter):
            yield self._collate(batch, counter.take())

    def __iter__(self) -> Iterator[dict]:
        worker, n_workers = self._worker()
        counter = SkipCounter()
        rng = self._rng(worker, 1)
        if self.train:
            raw = tar_samples(self._train_shards(worker, n_workers), counter.handler)
            raw = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=self._rng(worker, 2))(raw)
            share, done = (n // n_workers + (worker < n % n_workers) for n in (self.batches_per_epoch,
                                                                               self.resume_batches))
            lists = self._sample_lists(raw, rng, counter)
            # Resuming: the DataLoader takes batches from its workers in turn, so this worker already
            # gave `done` of them. Decoding them again replays the augmentation RNG exactly; only
            # collation and batch transforms are spared.
            for _ in itertools.islice(lists, done):
                counter.take()
            # islice stops before decoding a batch beyond this worker's share
            for batch in itertools.islice(lists, share - done):
                yield self._collate(batch, counter.take())
        else:
            raw = tar_samples(({"url": u} for u in self.urls), counter.handler)
            yield from self._batches(self._val_samples(raw, worker, n_workers), counter, rng)

    def _val_samples(self, raw: Iterator[dict], worker: int, n_workers: int) -> Iterator[dict]:
        for i, sample in enumerate(s for s in raw if has_payload(s)):
            j, r = divmod(i, self.world_size)
            if j >= self.samples_per_rank:
                return
            if r == self.rank and j % n_workers == worker:
                yield sample


class EpochLoader(DataLoader):
    """DataLoader that tells its ShardStream the epoch before each pass, so every epoch draws a
    new shuffle. (Lightning's set_epoch hook only reaches samplers, which iterable datasets lack.)
    Workers are forked per pass and receive the updated epoch.

    Resumable: `state_dict()` is the epoch and the number of batches handed out in it; Lightning
    stores it in its checkpoints (loops.fit_loop.state_dict.combined_loader) and, on a mid-epoch
    restart, calls `load_state_dict()` before the first pass, which then yields only the rest of
    that epoch. Each pass seeds the worker processes from its own generator, (seed, epoch, rank),
    so iterating never draws from the global torch RNG that training uses.
    """

    def __init__(self, dataset: ShardStream, start_epoch: int = 0, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._next_epoch = start_epoch
        self._epoch, self._served, self._resume_at = start_epoch, 0, 0
        self._used = True  # the last pass handed out a batch (none yet: the first pass starts an epoch)

    def __iter__(self) -> Iterator:
        # A pass that handed out no batch does not use up its epoch: Lightning opens one when it
        # restarts a run stopped during validation, and iterates again for the next epoch.
        if self._used:
            self._epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
            self.dataset.resume_batches, self._resume_at = self._resume_at, 0
        self._used = False
        self.dataset.epoch = self._epoch
        # salt (0, 3): apart from the workers' (worker, 0..2)
        self.generator = torch.Generator().manual_seed(self.dataset.seed_for(0, 3) % 2**63)
        return self._count(super().__iter__(), self.dataset.resume_batches)

    def _count(self, batches: Iterator, start: int) -> Iterator:
        self._served = start
        for batch in batches:
            self._served += 1
            self._used = True
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: the epoch of the current pass and the batches handed out in it."""
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state` (from `state_dict()`) at the next pass."""
        if state["batches"] >= len(self):  # that epoch was complete: start the next one
            self._next_epoch, self._resume_at = state["epoch"] + 1, 0
        else:
            self._next_epoch, self._resume_at = state["epoch"], state["batches"]
        self._used = True


def _batch_as_built(batch: dict) -> dict:
    """The loader's collate_fn: ShardStream's batches are ready (stacked tensors, lists), so the
    DataLoader's default per-element conversion walk over every caption and metadata entry is
    skipped (about 5% of the single-process loading time on the synthetic shards)."""
    return batch


def make_loader(dataset: ShardStream, num_workers: int, start_epoch: int = 0) -> EpochLoader:
    """A loader over `dataset`: batching happens in the dataset, so batch_size=None here."""
    return EpochLoader(dataset, start_epoch=start_epoch, num_workers=num_workers, collate_fn=_batch_as_built,
                       pin_memory=torch.cuda.is_available(), persistent_workers=False)
