"""Streaming batches from WebDataset shards, the same way on one CPU or many DDP ranks.

Training streams are infinite and sliced into a fixed number of batches per rank and epoch, so
every rank takes the same number of optimiser steps whatever the shard sizes (uneven shards
never hang or crash a run). Validation streams read every sample exactly once, split across
ranks at the sample level and truncated to an equal count per rank.

Rank and world size are passed in explicitly (the datamodule takes them from the Trainer);
workers are found with torch.utils.data.get_worker_info(). All randomness is seeded from
(seed, epoch, rank, worker), so a stream is reproducible, and a training stream can restart
mid-epoch exactly where it stopped (EpochLoader.state_dict, saved in Lightning checkpoints).

A sample that cannot be used is skipped and counted, never fatal on its own (SkipCounter): each
batch carries the samples skipped since the previous one (`skipped`) and where (`skipped_where`).
A stream whose skips come `max_consecutive_skips` in a row, with no usable sample between them,
cannot make a batch and stops with an error naming the last shard and sample.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.index import ShardIndex, count_from_index, shard_counts
from ldm.data.tar import DamagedShard, DuplicateMember, tar_samples
from ldm.data.transforms import ImageTransform, MapSizeError, read_ids

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
# A latent cache sample (ldm.data.latents) holds first-stage moments in place of the image.
MOMENTS_KEY = "moments.npy"
# Batch entries that are the pipeline's bookkeeping, not sample data.
BOOKKEEPING_KEYS = ("skipped", "skipped_where")
# Skips described per batch in `skipped_where` (the count is always complete).
WHERE_PER_BATCH = 3


def has_payload(raw: dict) -> bool:
    """Whether a raw sample holds an image or cached first-stage moments."""
    return MOMENTS_KEY in raw or any(k in raw for k in IMAGE_KEYS)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern, a '::'-separated list, a list, or a folder: with an
    index.json its shards in order, else every .tar in it by name (an img2dataset output folder,
    whose .parquet and _stats.json files lie beside the tars). `pipe:` and remote URLs pass
    through unchanged."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            path = Path(part)
            if "://" not in part and not part.startswith("pipe:") and path.is_dir():
                index = ShardIndex.load(path)
                names = sorted(index.shards) if index is not None else sorted(p.name for p in path.glob("*.tar"))
                if not names:
                    raise FileNotFoundError(f"{path} is a folder without index.json or .tar shards; pass shard files "
                                            "or a brace pattern")
                out.extend(str(path / name) for name in names)
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


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """Refuse a count that is not a positive integer, naming the config key (`data.<name>`)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{name} must be a positive integer, got {value!r}")


class SkipLimitError(RuntimeError):
    """A stream skipped `max_consecutive_skips` samples in a row: it cannot make a batch."""


@dataclass
class SkipCounter:
    """The samples a stream dropped since its last batch, one count per sample.

    A sample that fails to decode counts 1. A shard that cannot be opened, or that breaks off or
    ends early, counts the samples of it that were lost: its index.json count (`expected`) minus
    the complete samples read, or 1 when there is no index to say. Each of these events is one
    skip in a row; `limit` skips in a row with no usable sample between them raise SkipLimitError.
    """

    expected: dict[str, int] = field(default_factory=dict)  # shard URL -> samples (index.json)
    limit: int | None = None
    pending: int = 0
    where: list[str] = field(default_factory=list)
    in_a_row: int = 0
    _broken: dict[str, Exception] = field(default_factory=dict)  # shard URL -> why it stopped

    def skip(self, n: int, where: str) -> None:
        """Count `n` samples lost at `where` (one skip in a row)."""
        self.pending += n
        if len(self.where) < WHERE_PER_BATCH:
            self.where.append(where)
        self.in_a_row += 1
        if self.limit is not None and self.in_a_row >= self.limit:
            raise SkipLimitError(
                f"{self.in_a_row} samples or shards in a row were skipped (data.max_consecutive_skips="
                f"{self.limit}) and none gave a usable sample, so this stream cannot make a batch. The last: "
                f"{where}. Check that the shards are whole tar files whose samples hold an image "
                f"({', '.join('.' + k for k in IMAGE_KEYS)}) or the {MOMENTS_KEY} of a latent cache (docs/data.md)")

    def kept(self) -> None:
        """A sample made it into a batch: the run of skips is over."""
        self.in_a_row = 0

    def handler(self, exn: Exception) -> bool:
        """webdataset-style exception handler of the tar reader: note why a shard broke off (counted
        by `shard_done`), continue."""
        if isinstance(exn, DuplicateMember):
            return True  # the sample keeps its first copy of the member: nothing lost
        url = exn.url if isinstance(exn, DamagedShard) else str(exn.args[-1]) if exn.args else "?"
        self._broken[url] = exn  # an unopenable shard: webdataset's opener appends the URL to args
        return True

    def shard_done(self, url: str, samples: int) -> None:
        """`samples` complete samples came out of shard `url`: count what it lost."""
        broken = self._broken.pop(url, None)
        expected = self.expected.get(url)
        if expected is not None:
            if samples < expected:
                why = f"{broken}" if broken is not None else "the tar stream ended early"
                self.skip(expected - samples, f"{url}: {expected - samples} of its {expected} samples "
                                              f"(index.json) lost after {samples}: {why}")
        elif broken is not None:
            self.skip(1, f"{url}: an unknown number of samples lost after {samples} (no index.json "
                         f"count): {type(broken).__name__}: {broken}")

    def take(self) -> tuple[int, tuple[str, ...]]:
        """(samples skipped, where) since the last call; resets both."""
        n, where = self.pending, tuple(self.where)
        self.pending, self.where = 0, []
        return n, where


class LabelRangeError(ValueError):
    """A label map holds ids beyond the classes the run was configured for."""


# Errors that say the data and the run do not fit together, not that one sample is damaged: they
# stop the stream at once instead of being skipped and counted.
DATA_MISMATCH = (MapSizeError, LabelRangeError)


@dataclass
class SampleDecoder:
    """Raw tar members -> a training sample dict (image tensor, caption, class label).

    Latent cache samples (`moments.npy`, no image, see ldm.data.latents) give `moments` (the
    stored tensor) and `__url__` (their shard, so a mismatch error can name the cache) instead.
    `extra_keys` maps batch keys to member extensions decoded by type: json -> object,
    txt -> str, cls -> int, npy -> tensor; e.g. {meta: json} for the metadata, which no model
    reads and is therefore not decoded unless asked for.
    `label_maps` maps batch keys to one-channel PNG members of per-pixel ids at the image's size
    ({segmentation: seg.png}, {stored_mask: mask.png}): int64 (size, size) tensors that get the
    image's resize (nearest-neighbour), crop and flip. `label_classes` ({segmentation: 182}) bounds
    a map's ids. A map of another size than its image, or with an id out of bounds, stops the
    stream (DATA_MISMATCH); a sample without its map is skipped and counted.
    """

    transform: ImageTransform
    extra_keys: dict[str, str] = field(default_factory=dict)
    label_maps: dict[str, str] = field(default_factory=dict)
    label_classes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.label_classes) - set(self.label_maps)
        if unknown:
            raise ValueError(f"data.label_classes names {sorted(unknown)}, which data.label_maps does not read "
                             f"(it reads {sorted(self.label_maps)})")

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None and MOMENTS_KEY not in raw:
            members = ", ".join(f"{raw.get('__key__')}.{k}" for k in raw if not k.startswith("__")) or "none"
            raise ValueError(f"sample {raw.get('__key__')} has no image member "
                             f"({', '.join('.' + k for k in IMAGE_KEYS)}) nor the {MOMENTS_KEY} of a latent "
                             f"cache; its members: {members}")
        sample: dict = {}
        if key is not None and self.label_maps:
            sample["image"], maps = self._aligned(raw, key, rng)
            sample.update(maps)
        elif key is not None:
            sample["image"] = _member(raw, key, lambda data: self.transform.decode(data, rng))
        if MOMENTS_KEY in raw:
            sample["moments"] = _member(raw, MOMENTS_KEY, lambda data: _decode_member("npy", data))
            sample["__url__"] = raw.get("__url__", "")
        sample.update({
            "caption": _member(raw, "txt", lambda data: data.decode("utf-8").strip()) if "txt" in raw else "",
            "class_label": _member(raw, "cls", int) if "cls" in raw else -1,
            "__key__": raw["__key__"],
        })
        for name, ext in self.extra_keys.items():
            if ext not in raw:
                raise KeyError(f"sample {raw['__key__']} lacks member .{ext} (data.extra_keys.{name})")
            sample[name] = _member(raw, ext, lambda data, ext=ext: _decode_member(ext, data))
        return sample


    def _aligned(self, raw: dict, key: str, rng: random.Random) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image and its label maps, transformed alike."""
        where = f"{raw.get('__url__', '?')}: sample {raw['__key__']}"
        maps = {}
        for name, member in self.label_maps.items():
            if member not in raw:
                raise KeyError(f"sample {raw['__key__']} lacks member .{member} (data.label_maps.{name})")
            maps[name] = _member(raw, member, lambda data, m=member: read_ids(data, f"{raw['__key__']}.{m}"))
            high = self.label_classes.get(name)
            if high is not None and maps[name].size and (maps[name].min() < 0 or maps[name].max() >= high):
                raise LabelRangeError(
                    f"{where}: {member} holds ids {int(maps[name].min())}..{int(maps[name].max())}, but the run "
                    f"takes {high} classes (ids 0..{high - 1}, data.label_classes.{name}, from cond.n_classes for a "
                    f"semantic model): set cond.n_classes to at least {int(maps[name].max()) + 1}, or remap the ids")
        try:
            return _member(raw, key, lambda data: self.transform.decode_aligned(data, maps, rng))
        except ValueError as err:
            if isinstance(err.__cause__, MapSizeError):
                raise MapSizeError(f"{where}: {err.__cause__}") from err.__cause__
            raise


def _member(raw: dict, ext: str, decode: Callable[[bytes], object]):
    """`decode` of member `ext` of a raw sample; a failure names the member."""
    try:
        return decode(raw[ext])
    except Exception as exn:
        raise ValueError(f"member {raw['__key__']}.{ext}: {type(exn).__name__}: {exn}") from exn


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


def collate(samples: list[dict], skipped: int, skipped_where: tuple[str, ...] = ()) -> dict:
    """Stack a list of sample dicts into a batch dict (with the pipeline's BOOKKEEPING_KEYS; the
    notes are a tuple, so code that treats every list as a batched entry passes them by)."""
    batch: dict = {"skipped": skipped, "skipped_where": skipped_where}
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
                 batch_transforms: list[Callable[[dict], dict]] | None = None, max_consecutive_skips: int = 1000):
        check_positive("batch_size", batch_size)
        check_positive("batches_per_epoch", batches_per_epoch, allow_none=not train)
        check_positive("max_consecutive_skips", max_consecutive_skips)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.urls = expand_urls(urls)
        self.expected = shard_counts(self.urls)
        self.batch_transforms = list(batch_transforms or [])
        self.batch_size, self.decoder, self.train = batch_size, decoder, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch, self.shuffle_buffer, self.resampled = batches_per_epoch, shuffle_buffer, resampled
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = 0
        self.resume_batches = 0  # batches of this epoch (this rank, all workers) already consumed
        self.samples_per_rank = None
        if not train:
            total = count_samples(self.urls)
            if max_samples is not None:
                total = min(total, max_samples)
            self.samples_per_rank = total // world_size
            if total == 0:
                raise ValueError(f"no sample in {urls!r} holds an image ({', '.join('.' + k for k in IMAGE_KEYS)}) "
                                 "to validate on")
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

    def check_workers(self, n_workers: int) -> None:
        """Refuse, before any batch, a split of the shards that leaves some worker of some rank
        without a shard (every rank and worker gets at least one when shards >= ranks x workers)."""
        if self.train and not self.resampled and len(self.urls) < self.world_size * n_workers:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {self.world_size} rank(s) x {n_workers} "
                "worker(s): write more, smaller shards (--per-shard), use fewer data.num_workers, "
                "or set data.resampled=true")

    def _train_shards(self, worker: int, n_workers: int) -> Iterator[str]:
        rng = self._rng(worker, 0)
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        self.check_workers(n_workers)
        mine = self.urls[self.rank::self.world_size][worker::n_workers]
        while True:  # endless passes over this worker's shards, reshuffled each pass
            order = list(mine)
            rng.shuffle(order)
            yield from order

    def _read(self, urls: Iterator[str], counter: SkipCounter) -> Iterator[dict]:
        """Raw samples of the shards `urls`, in order; what a shard lost goes to `counter`."""
        for url in urls:
            n = 0
            for raw in tar_samples([{"url": url}], counter.handler):
                n += 1
                yield raw
            counter.shard_done(url, n)

    def _collate(self, samples: list[dict], counter: SkipCounter) -> dict:
        batch = collate(samples, *counter.take())
        for transform in self.batch_transforms:  # e.g. SR / inpainting degradations, in the workers
            batch = transform(batch)
        return batch

    def _sample_lists(self, samples: Iterator[dict], rng: random.Random, counter: SkipCounter) -> Iterator[list[dict]]:
        """Decoded samples grouped into batch-sized lists (the last one may be shorter)."""
        batch: list[dict] = []
        for raw in samples:
            try:
                sample = self.decoder(raw, rng)
            except DATA_MISMATCH:  # the data does not fit the run: skipping would drop every sample
                raise
            except Exception as exn:  # an undecodable sample is skipped and counted, never fatal alone
                counter.skip(1, f"{raw.get('__url__', '?')}: {exn}")
                continue
            counter.kept()
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _batches(self, samples: Iterator[dict], counter: SkipCounter, rng: random.Random) -> Iterator[dict]:
        for batch in self._sample_lists(samples, rng, counter):
            yield self._collate(batch, counter)

    def __iter__(self) -> Iterator[dict]:
        if get_worker_info() is not None:
            _leave_stopping_to_the_main_process()
        worker, n_workers = self._worker()
        counter = SkipCounter(self.expected, self.max_consecutive_skips)
        rng = self._rng(worker, 1)
        if self.train:
            raw = self._read(self._train_shards(worker, n_workers), counter)
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
                yield self._collate(batch, counter)
        else:
            raw = self._read(iter(self.urls), counter)
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

    A stop requested while the loader waits for a batch ends the wait (single process only): a
    SIGTERM then, or one that came before the wait when `stop_requested()` says so (the
    datamodule passes the Trainer's flag), raises Lightning's SIGTERMException.

    Resumable: `state_dict()` is the epoch and the number of batches handed out in it; Lightning
    stores it in its checkpoints (loops.fit_loop.state_dict.combined_loader) and, on a mid-epoch
    restart, calls `load_state_dict()` before the first pass, which then yields only the rest of
    that epoch. Each pass seeds the worker processes from its own generator, (seed, epoch, rank),
    so iterating never draws from the global torch RNG that training uses.
    """

    def __init__(self, dataset: ShardStream, start_epoch: int = 0,
                 stop_requested: Callable[[], bool] | None = None, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        dataset.check_workers(max(self.num_workers, 1))
        self.stop_requested = stop_requested
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
        alone = self.dataset.world_size == 1
        while True:
            if alone and self.stop_requested is not None and self.stop_requested():
                raise SIGTERMException  # a signal that came before this wait (e.g. during setup)
            with _stop_signal_ends_wait(alone):
                batch = next(batches, _END)
            if batch is _END:
                return
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


_END = object()
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def _leave_stopping_to_the_main_process() -> None:
    """In a loader worker: a stop signal (SIGTERM, or SLURM's SIGUSR1) ends the worker with exit
    code 0. `timeout`, SLURM and process-group kills signal every process of a run; a worker killed
    by the signal would make torch's SIGCHLD handler raise in the main process, mid-step or while
    the Preemption callback writes last.ckpt, where the Trainer would stop cleanly at the batch
    boundary. After a stop signal the main process takes no more batches."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: os._exit(0))


@contextmanager
def _stop_signal_ends_wait(active: bool) -> Iterator[None]:
    """While the loader waits for a batch, make SIGTERM also end the wait.

    Lightning's SIGTERM handler only sets a flag that the loop reads at the next batch boundary,
    so a stream that never makes a batch (shards that hang or give nothing usable) would ignore the
    signal. Inside this block SIGTERM runs that handler and then raises Lightning's SIGTERMException
    right here: no training step is running, so this is a batch boundary too (the Preemption
    callback saves last.ckpt at the last finished step). Only in a single process (`active`): under
    DDP one rank stopping early would leave the others in a collective. A default or ignored
    SIGTERM handler is left alone (the process ends, or goes on, as before).
    """
    previous = signal.getsignal(signal.SIGTERM)
    if not active or not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        previous(signum, frame)
        raise SIGTERMException

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _batch_as_built(batch: dict) -> dict:
    """The loader's collate_fn: ShardStream's batches are ready (stacked tensors, lists), so the
    DataLoader's default per-element conversion walk over every caption and metadata entry is
    skipped (about 5% of the single-process loading time on the synthetic shards)."""
    return batch


def make_loader(dataset: ShardStream, num_workers: int, start_epoch: int = 0,
                stop_requested: Callable[[], bool] | None = None) -> EpochLoader:
    """A loader over `dataset`: batching happens in the dataset, so batch_size=None here."""
    return EpochLoader(dataset, start_epoch=start_epoch, stop_requested=stop_requested, num_workers=num_workers,
                       collate_fn=_batch_as_built, pin_memory=torch.cuda.is_available(), persistent_workers=False)
