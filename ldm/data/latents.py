"""The latent cache: image shards encoded once by a trained first stage, for training the latent
diffusion stage without running the encoder.

    python -m ldm.data.latents --first-stage runs/ae --shards data/train --out data/train-latents

Each output sample keeps the input's members except the image (`.txt`, `.cls`, `.json`, ...) and
adds `moments.npy`: for a KL first stage the (2C, h, w) concatenation of the posterior's mean and
log-variance, so training still draws a fresh posterior sample every step; for VQ (the
pre-quantisation latent) and identity first stages the (C, h, w) latent itself. Images are
centre-cropped at the first stage's training resolution (or --image-size): random crops and flips
would be frozen into the cache, so there are none.

Shards are written by ldm.data.write.write_shards: atomic, resumable (rerun the same command),
and `index.json` records the first-stage checkpoint (path and SHA-256), f, latent channels, kind
('kl' or 'deterministic') and the stored dtype. A training run reading a cache checks these
against its own first stage (posterior_from_moments).
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import io
import itertools
import multiprocessing
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from omegaconf import OmegaConf

from ldm.data.index import INDEX_NAME, ShardIndex
from ldm.data.pipeline import IMAGE_KEYS, MOMENTS_KEY, SampleDecoder, count_samples, expand_urls
from ldm.data.sources import Members
from ldm.data.transforms import ImageTransform
from ldm.data.tar import tar_samples
from ldm.data.write import CLI_EXISTS_ADVICE, write_shards
from ldm.first_stage.base import FirstStage, Posterior
from ldm.first_stage.distributions import DeterministicLatent, DiagonalGaussian
from ldm.first_stage.kl import AutoencoderKL
from ldm.modules.loading import find_checkpoint, load_first_stage

DTYPES = {"float16": torch.float16, "float32": torch.float32}
PREFETCH_BATCHES = 4  # decoded batches kept ahead of the encoder when decoding in worker processes


# --- moments <-> posteriors (pure) -----------------------------------------------------------
def latent_kind(first_stage: FirstStage) -> str:
    """'kl' for first stages whose posterior is a diagonal Gaussian, else 'deterministic'
    (VQ pre-quantisation latents, identity)."""
    return "kl" if isinstance(first_stage, AutoencoderKL) else "deterministic"


def moment_channels(first_stage: FirstStage) -> int:
    """Channels of the cached moments of `first_stage`: 2C (mean, logvar) for KL, else C."""
    c = first_stage.latent_channels
    return 2 * c if latent_kind(first_stage) == "kl" else c


def posterior_moments(posterior: Posterior) -> tuple[torch.Tensor, str]:
    """(moments, kind) of an encoder output: cat(mean, logvar) on channels for a DiagonalGaussian
    ('kl'), the latent for a DeterministicLatent ('deterministic')."""
    if isinstance(posterior, DiagonalGaussian):
        return torch.cat([posterior.mean, posterior.logvar], dim=1), "kl"
    if isinstance(posterior, DeterministicLatent):
        return posterior.latent, "deterministic"
    raise TypeError(f"cannot cache a {type(posterior).__name__} posterior: "
                    "expected a DiagonalGaussian or a DeterministicLatent")


def _describe(first_stage: FirstStage) -> str:
    return (f"{type(first_stage).__name__} (kind {latent_kind(first_stage)}, f = {first_stage.downsampling_factor}, "
            f"{first_stage.latent_channels} latent channels, so {moment_channels(first_stage)} moment channels)")


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


def posterior_from_moments(moments: torch.Tensor, first_stage: FirstStage,
                           urls: Iterable[str] | None = None) -> Posterior:
    """The posterior a latent cache's `moments` (B, 2C or C, h, w) stand for under `first_stage`:
    a DiagonalGaussian for KL, the latent itself otherwise.

    urls: the shards the moments came from (the batch's `__url__`). The index of each local cache
    is checked against the first stage (kind, f, channels), so latents of another autoencoder
    (e.g. same C, another f) are refused instead of silently trained on.
    """
    folders = sorted({str(Path(u).parent) if _is_local(u) else u.rsplit("/", 1)[0] for u in urls or [] if u})
    caches = ", ".join(folders) or "(location unknown)"
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
                f"which does not match this model's first stage {_describe(fs)}. Set first_stage.path to the run "
                "that wrote the cache, or re-encode it with `python -m ldm.data.latents --first-stage <this run>`")
    if moments.dim() != 4 or moments.shape[1] != moment_channels(fs):
        raise ValueError(
            f"latent cache {caches} holds moments of shape {tuple(moments.shape[1:])} per sample, but this model's "
            f"first stage is {_describe(fs)}. Re-encode the cache with `python -m ldm.data.latents --first-stage "
            "<this model's first-stage run>` or set first_stage.path to the run that wrote it")
    return DiagonalGaussian(moments) if latent_kind(fs) == "kl" else DeterministicLatent(moments)


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


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of the checkpoint of a run folder or .ckpt file (identifies the encoder exactly)."""
    with open(find_checkpoint(path), "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def training_resolution(path: str | Path) -> int:
    """The image size a first-stage run trained at (data.image_size of its config.yaml)."""
    path = Path(path)
    config = path / "config.yaml" if path.is_dir() else path.parent.parent / "config.yaml"
    size = OmegaConf.select(OmegaConf.load(config), "data.image_size") if config.is_file() else None
    if size is None:
        raise ValueError(f"cannot tell the training resolution of {path} (no data.image_size in {config}); "
                         "pass --image-size")
    return int(size)


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


def resolve_device(device: str) -> torch.device:
    """'auto' -> the GPU when there is one, else the CPU; other names pass to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def encode_shards(first_stage: str | Path, shards: str | list[str], out: str | Path, *,
                  image_size: int | None = None, batch_size: int = 64, device: str = "auto",
                  dtype: str = "float16", workers: int = 0, per_shard: int = 1000, prefix: str = "shard",
                  overwrite: bool = False, progress: bool = True) -> ShardIndex:
    """Encode the image shards `shards` with the first stage of the run `first_stage` (folder or
    .ckpt) into a latent cache under `out`; returns its index. Resumes an interrupted job."""
    dev = resolve_device(device)
    model = load_first_stage(first_stage).to(dev)
    source = LatentSource(shards, model, first_stage, image_size=image_size or training_resolution(first_stage),
                          batch_size=batch_size, device=dev, dtype=dtype, workers=workers)
    return write_shards(source, out, per_shard=per_shard, prefix=prefix, overwrite=overwrite, progress=progress)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.data.latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first-stage", required=True, help="first-stage run folder or .ckpt file")
    p.add_argument("--shards", nargs="+", required=True,
                   help="image shards: folders with index.json, brace patterns, '::'-separated lists")
    p.add_argument("--out", required=True, help="output folder for the latent shards and index.json")
    p.add_argument("--image-size", type=int,
                   help="centre-crop side in pixels (default: the first stage's training resolution)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage type of the moments")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes (0: in this process)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per output shard")
    p.add_argument("--prefix", default="shard", help="output shard file name prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a cache written with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    t0 = time.time()
    try:
        index = encode_shards(args.first_stage, args.shards, args.out, image_size=args.image_size,
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype, workers=args.workers,
                              per_shard=args.per_shard, prefix=args.prefix, overwrite=args.overwrite,
                              progress=not args.quiet)
    except FileExistsError as err:
        raise SystemExit(f"{err}: {CLI_EXISTS_ADVICE}") from err
    s = index.settings
    print(f"{index.total} samples in {len(index.shards)} shards under {args.out}: {s['kind']} moments of "
          f"f = {s['f']}, {s['latent_channels']} latent channels, {s['dtype']} "
          f"({s.get('skipped', 0)} unreadable skipped, {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
