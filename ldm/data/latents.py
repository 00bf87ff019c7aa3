"""The latent cache: image shards encoded once by a trained first stage, for training the latent
diffusion stage without running the encoder. The command line is ldm.cli.encode_latents
(`ldm-encode-latents`); here the first stage comes as an object, loaded by the caller.

Each output sample keeps the input's members except the image (`.txt`, `.cls`, `.json`, ...) and
adds `moments.npy`, the first stage's moments (ldm.first_stage.moments). Images are centre-cropped
at the given size: random crops and flips would be frozen into the cache, so there are none.

Shards are written by ldm.data.write.write_shards: atomic, resumable (rerun the same command),
and `index.json` records the first-stage checkpoint (path and SHA-256), f, latent channels, kind
('kl' or 'deterministic') and the stored dtype. A training run reading a cache checks these
against its own first stage (cached_posterior).
"""
from __future__ import annotations

import collections
import functools
import io
import itertools
import multiprocessing
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from ldm.data.index import INDEX_NAME, ShardIndex
from ldm.data.pipeline import IMAGE_KEYS, MOMENTS_KEY, SampleDecoder, count_samples, expand_urls
from ldm.data.sources import Members
from ldm.data.transforms import ImageTransform
from ldm.data.tar import tar_samples
from ldm.data.write import write_shards
from ldm.first_stage.base import FirstStage, Posterior
from ldm.first_stage.moments import REENCODE, describe, latent_kind, posterior_from_moments, posterior_moments
from ldm.utils.checkpoint import checkpoint_sha256, find_checkpoint
from ldm.utils.device import resolve_device

DTYPES = {"float16": torch.float16, "float32": torch.float32}
PREFETCH_BATCHES = 4  # decoded batches kept ahead of the encoder when decoding in worker processes


# --- cache indices ---------------------------------------------------------------------------
def cache_settings(folder: str | Path) -> dict | None:
    """The index settings of the latent cache in local `folder`, None when it is not one."""
    path = Path(folder) / INDEX_NAME
    return _read_cache_settings(str(folder), path.stat().st_mtime_ns if path.is_file() else None)


@functools.lru_cache(maxsize=64)
def _read_cache_settings(folder: str, mtime_ns: int | None) -> dict | None:
    # Keyed on the index's mtime: read once per training run, re-read when the cache is rewritten.
    index = ShardIndex.load(folder) if mtime_ns is not None else None
    return index.settings if index is not None and index.settings.get("source") == "latents" else None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_cache(urls: Iterable[str] | None, first_stage: FirstStage) -> str:
    """Refuse moments from the shards `urls` (a batch's `__url__`) when the index of a local cache
    among them was written by another kind of first stage (kind, f, channels): latents of another
    autoencoder (e.g. same C, another f) are refused instead of silently trained on. Returns the
    caches' folders, for the messages of posterior_from_moments."""
    folders = sorted({str(Path(u).parent) if _is_local(u) else u.rsplit("/", 1)[0] for u in urls or [] if u})
    fs = first_stage
    for folder in folders:
        settings = cache_settings(folder) if _is_local(folder) else None
        if settings is None:
            continue
        theirs = {k: settings.get(k) for k in ("kind", "f", "latent_channels")}
        ours = {"kind": latent_kind(fs), "f": fs.downsampling_factor, "latent_channels": fs.latent_channels}
        if theirs != ours:
            raise ValueError(
                f"latent cache {folder} was encoded by the first stage {settings.get('first_stage')} ({theirs}), "
                f"which does not match this model's first stage {describe(fs)}. Set first_stage.path to the run "
                f"that wrote the cache, or re-encode it with `{REENCODE}`")
    return ", ".join(folders) or "(location unknown)"


def cached_posterior(moments: torch.Tensor, first_stage: FirstStage, urls: Iterable[str] | None = None) -> Posterior:
    """The posterior that a latent cache's `moments` stand for under `first_stage`, after checking
    the caches they came from (`urls`, see check_cache)."""
    return posterior_from_moments(moments, first_stage, check_cache(urls, first_stage))


# --- reading image shards in a fixed, resumable order ------------------------------------------
def _image_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples with an image member, in shard order (the order count_samples counts)."""
    raw = tar_samples(({"url": u} for u in urls), wds.warn_and_continue)
    return (s for s in raw if any(k in s for k in IMAGE_KEYS))


def _resume_point(urls: list[str], start: int) -> tuple[list[str], int]:
    """(shards still to read, samples to skip in the first of them) for sample index `start`:
    whole shards are skipped by their index counts when every shard is local and indexed."""
    counts: list[int] = []
    indices: dict[Path, ShardIndex | None] = {}
    for url in urls:
        path = Path(url)
        if not _is_local(url):
            return urls, start
        index = indices.setdefault(path.parent, ShardIndex.load(path.parent))
        if index is None or path.name not in index.shards:
            return urls, start
        counts.append(index.shards[path.name])
    first = 0
    while first < len(urls) and start >= counts[first]:
        start -= counts[first]
        first += 1
    return urls[first:], start


def _image_only(raw: dict) -> dict:
    """The members the image decoder needs (less to send to worker processes)."""
    key = next(k for k in IMAGE_KEYS if k in raw)
    return {key: raw[key], "__key__": raw["__key__"], "__url__": raw.get("__url__", "")}


def _decode_image(decoder: SampleDecoder, raw: dict) -> np.ndarray | None:
    """The (3, s, s) float32 image in [-1, 1], or None when it cannot be decoded."""
    try:
        return decoder(raw, random.Random(0))["image"].numpy()
    except Exception:  # any decoder failure: the sample is skipped and counted, as in training
        return None


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class LatentSource:
    """Samples of image shards with the image replaced by first-stage moments: a Source for
    ldm.data.write.write_shards (see the module docstring for the members).

    Samples come in shard order; undecodable images yield None (skipped and counted by the
    writer). `workers` > 0 decodes images in that many processes, in order.
    """

    def __init__(self, urls: str | list[str], first_stage: FirstStage, first_stage_path: str | Path, *,
                 image_size: int, batch_size: int = 64, device: str | torch.device = "cpu",
                 dtype: str = "float16", workers: int = 0):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1 or workers < 0:
            raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
        f = first_stage.downsampling_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the first stage's f = {f}")
        self.urls = expand_urls(urls)
        if any(_is_local(u) and cache_settings(Path(u).parent) for u in self.urls):
            raise ValueError(f"{urls} is already a latent cache: pass the image shards it was made from")
        self.n = count_samples(self.urls)
        self.first_stage, self.device = first_stage.eval(), torch.device(device)
        self.first_stage_path = str(find_checkpoint(first_stage_path).resolve())
        self.first_stage_sha256 = checkpoint_sha256(first_stage_path)
        self.image_size, self.batch_size, self.dtype, self.workers = image_size, batch_size, dtype, workers
        self.kind = latent_kind(first_stage)
        self.decoder = SampleDecoder(ImageTransform(image_size, "center", False))
        folders = {Path(u).parent for u in self.urls if _is_local(u)}
        index = ShardIndex.load(folders.pop()) if len(folders) == 1 else None
        self.classes = index.classes if index is not None else None

    def __len__(self) -> int:
        return self.n

    def settings(self) -> dict:
        fs = self.first_stage
        return {"source": "latents", "shards": [str(Path(u).resolve()) if _is_local(u) else u for u in self.urls],
                "n": self.n, "first_stage": self.first_stage_path, "first_stage_sha256": self.first_stage_sha256,
                "f": fs.downsampling_factor, "latent_channels": fs.latent_channels, "kind": self.kind,
                "dtype": self.dtype, "image_size": self.image_size}

    def iter_from(self, start: int) -> Iterator[Members | None]:
        urls, skip = _resume_point(self.urls, start)
        remaining = self.n - start
        produced = 0
        for members in self._encoded(self._decoded(itertools.islice(_image_samples(urls), skip, None))):
            if produced == remaining:
                return
            produced += 1
            yield members
        # Samples the reader lost (an unreadable tar member): keep the count, as the writer needs it.
        yield from itertools.repeat(None, remaining - produced)

    def _decoded(self, raws: Iterator[dict]) -> Iterator[tuple[dict, np.ndarray | None]]:
        """(raw sample, decoded image or None) in input order."""
        decode = functools.partial(_decode_image, self.decoder)
        if not self.workers:
            yield from ((raw, decode(_image_only(raw))) for raw in raws)
            return
        # One thread per worker: forked workers with intra-op thread pools can oversubscribe or hang.
        with multiprocessing.get_context().Pool(self.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending: collections.deque = collections.deque()
            for chunk in _chunks(raws, self.batch_size):
                pending.append((chunk, pool.map_async(decode, [_image_only(r) for r in chunk])))
                if len(pending) > PREFETCH_BATCHES:
                    chunk, images = pending.popleft()
                    yield from zip(chunk, images.get())
            while pending:
                chunk, images = pending.popleft()
                yield from zip(chunk, images.get())

    def _encoded(self, decoded: Iterator[tuple[dict, np.ndarray | None]]) -> Iterator[Members | None]:
        """Output members in input order, encoding `batch_size` images at a time."""
        entries: list[tuple[dict, np.ndarray | None]] = []
        n_images = 0
        for entry in decoded:
            entries.append(entry)
            n_images += entry[1] is not None
            if n_images == self.batch_size:
                yield from self._flush(entries)
                entries, n_images = [], 0
        yield from self._flush(entries)

    def _flush(self, entries: list[tuple[dict, np.ndarray | None]]) -> Iterator[Members | None]:
        images = [image for _, image in entries if image is not None]
        moments = iter(self.encode(np.stack(images)) if images else [])
        for raw, image in entries:
            if image is None:
                yield None
                continue
            members: Members = {k: v for k, v in raw.items() if not k.startswith("__") and k not in IMAGE_KEYS}
            members[MOMENTS_KEY] = _npy_bytes(next(moments))
            yield members

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, 2C or C, h, w) moments in the cache dtype of (B, 3, s, s) images in [-1, 1]."""
        x = torch.from_numpy(images).to(self.device)
        moments, kind = posterior_moments(self.first_stage.encode(x))
        if kind != self.kind:
            raise TypeError(f"the first stage returned a {kind} posterior, expected {self.kind}")
        if not torch.isfinite(moments).all():
            raise ValueError(f"the first stage {self.first_stage_path} produced non-finite moments")
        stored = moments.to(DTYPES[self.dtype])
        if not torch.isfinite(stored).all():
            raise ValueError(f"moments overflow {self.dtype} (largest magnitude {moments.abs().max().item():.4g}): "
                             "use --dtype float32")
        return stored.cpu().numpy()


def write_latent_cache(first_stage: FirstStage, checkpoint: str | Path, shards: str | list[str], out: str | Path, *,
                       image_size: int, batch_size: int = 64, device: str | torch.device | None = None,
                       dtype: str = "float16", workers: int = 0, per_shard: int = 1000, prefix: str = "shard",
                       overwrite: bool = False, progress: bool = True) -> ShardIndex:
    """Encode the image shards `shards` with `first_stage` (moved to `device`: None or 'auto' is
    the GPU when there is one) into a latent cache under `out`; returns its index. `checkpoint`:
    the run folder or .ckpt the first stage was loaded from, recorded in the index with its
    SHA-256. Resumes an interrupted job."""
    dev = resolve_device(device)
    source = LatentSource(shards, first_stage.to(dev), checkpoint, image_size=image_size, batch_size=batch_size,
                          device=dev, dtype=dtype, workers=workers)
    return write_shards(source, out, per_shard=per_shard, prefix=prefix, overwrite=overwrite, progress=progress)
