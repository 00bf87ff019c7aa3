"""The logic behind evaluate.py: FID-type metrics of a latent diffusion run, reconstruction
metrics of an autoencoder run, or the scores of given images, written to metrics.json.

- latent diffusion run (`ckpt=`): n samples under the conditions of the real batches
  (ldm.evaluation.protocol), scored against the real images; super-resolution and
  inpainting samples also against their own ground truth (PSNR, SSIM, LPIPS), inpainting
  samples with the known pixels pasted back;
- autoencoder run (`ckpt=`): the first n real images reconstructed (posterior mode, EMA weights
  when the run kept them); rFID (and the other metrics asked for), PSNR, SSIM, LPIPS;
- a released checkpoint (`ckpt=` the file, `reference_config=` its YAML): either of the above;
- `images=`: a folder of PNG/JPEG files or an .npz (N, H, W, 3) uint8 array, scored as they are;
- neither, with `real=` and `real_stats=`: only the real images' FID statistics, cached there.

Text-alignment metrics (prompt_accuracy, clip_score) score text models' samples against the
captions of the real batches they were generated under, and autoencoder reconstructions against
their images' captions; given images carry no captions.

The real side is `real` (shards) or the FID statistics cached in `real_stats`: read when the file
exists (FID only: the other real-side metrics need the images), else computed from `real` and
written there for the next run. A cache from another feature extractor is refused.

Every image is scored where it is made, one batch at a time, into a chunk file of the output
folder (ldm.evaluation.chunks: the per-image rows of the metrics' networks, ldm.metrics.rows),
and the metrics are computed from the chunks at the end, by rank 0. So the same command runs on
one process or on many ranks started by torchrun or srun (ldm.evaluation.distributed; each rank
makes every world-th batch), with the numbers of one process, and a stopped evaluation continues
in its folder where it stopped. `save_png` / `save_npz` keep the samples (PNG files,
`samples.npz` for the ADM evaluator).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MetricCollection
from tqdm import tqdm

from ldm.cli import launch
from ldm.convert.reference import load_reference
from ldm.data.pipeline import SampleDecoder, ShardStream, make_loader
from ldm.data.transforms import ImageTransform
from ldm.evaluation.chunks import ChunkStore, run_part
from ldm.evaluation.describe import describe_model, first_stage_kind
from ldm.evaluation.distributed import Ranks, rank_device, start_ranks
from ldm.evaluation.image_files import GivenImages, save_pngs, write_npz
from ldm.evaluation.protocol import (SamplingProtocol, build_extractors, check_caption_metrics, condition_chunks,
                                     generate, sample_captions)
from ldm.first_stage.base import FirstStage
from ldm.metrics.bootstrap import bootstrap_fid
from ldm.metrics.collection import CAPTION_METRICS, NO_REAL_SIDE, batch_rows, build_metrics, update_from_rows
from ldm.metrics.features import images_to_uint8
from ldm.metrics.fid import ExtractorMismatchError, load_statistics, save_statistics
from ldm.metrics.lpips import build_lpips
from ldm.metrics.reconstruction import psnr, ssim
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.modules.loading import load_module
from ldm.nets.concat import paste_known
from ldm.utils.checkpoint import find_checkpoint
from ldm.utils.device import autocast, autocast_dtype
from ldm.utils.trusted_config import check_trusted

log = logging.getLogger(__name__)

# What a run folder's data.batch_transforms may build without trust_config (configs/cond).
BATCH_TRANSFORM_TARGETS = frozenset({
    "ldm.data.degradations.SRDegradation",
    "ldm.data.degradations.InpaintingDegradation",
    "ldm.data.degradations.MaskGenerator",
})
SHARES = ("Rank 0 computes the metrics from the chunk files every rank writes there; put hydra.run.dir on a shared "
          "filesystem")
# Settings a stopped evaluation may change when it continues: where it runs, and how the stored
# rows are scored. The feature networks are compared by their name and settings (weights
# fingerprint included), not by their config, whose weight paths may differ between machines.
CONTINUABLE = frozenset({"out_dir", "paths", "task_name", "device", "rank_timeout_s", "shared_fs_timeout_s",
                         "trust_config", "real_stats", "features", "kid_subsets", "kid_subset_size", "is_splits",
                         "pr_k", "fid_bootstrap"})


# ----------------------------------------------------------------------------- inputs


def run_folder(ckpt: str | Path) -> Path | None:
    """The training run folder of a checkpoint (a run folder, or <run>/checkpoints/x.ckpt), if it is one."""
    path = Path(ckpt)
    folder = path if path.is_dir() else path.parent.parent
    return folder.resolve() if (folder / "config.yaml").is_file() else None


def batch_transforms(cfg: DictConfig, run: Path | None) -> list:
    """cfg.batch_transforms, or (null) the run's data.batch_transforms: they make the SR low-res
    inputs and inpainting masks of concat-conditioned models from the real images. The run's are
    built only from BATCH_TRANSFORM_TARGETS unless cfg.trust_config."""
    spec = cfg.batch_transforms
    if spec is None and run is not None:
        config = run / "config.yaml"
        spec = OmegaConf.load(config).get("data", {}).get("batch_transforms")
        if not cfg.trust_config:
            check_trusted(OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec, BATCH_TRANSFORM_TARGETS,
                          f"{config} (data.batch_transforms)")
    return list(instantiate(spec, _convert_="all") or [])


def real_stream(cfg: DictConfig, image_size: int, transforms: list) -> ShardStream:
    """The real images of cfg.real (at most n_real), centre-cropped to image_size, in batches."""
    if not cfg.real:
        raise ValueError("pass real=<validation shards> (a folder with index.json, a brace pattern or a list)")
    return ShardStream(cfg.real, cfg.batch_size, SampleDecoder(ImageTransform(image_size)), train=False,
                       max_samples=cfg.n_real, batch_transforms=transforms)


# ----------------------------------------------------------------------------- real side


class RealSide:
    """Where the real side of the metrics comes from: cached FID statistics, the real images, or
    nowhere (IS alone has no real side). `wants_images`: whether real images must be fed."""

    def __init__(self, cfg: DictConfig, metrics: MetricCollection, names: list[str]):
        self.path = Path(cfg.real_stats) if cfg.real_stats else None
        self.cached = False
        self.n = 0
        self.needed = bool(set(names) - set(NO_REAL_SIDE))
        if self.path is not None:
            if "fid" not in names:
                raise ValueError("real_stats caches the real images' FID statistics: add fid to metrics or drop "
                                 "real_stats")
            if self.path.is_file():
                self._load(metrics, names)
            elif not cfg.real:
                raise FileNotFoundError(f"no statistics at {self.path}; pass real=<shards> as well to compute them "
                                        "(they are then written there)")
        if self.wants_images and not cfg.real:
            raise ValueError(f"{sorted(set(names) - set(NO_REAL_SIDE))} need real images: pass real=<validation "
                             "shards> (or, for FID, real_stats=<statistics .npz>)")

    def _load(self, metrics: MetricCollection, names: list[str]) -> None:
        need_images = sorted(set(names) - {"fid", *NO_REAL_SIDE})
        if need_images:
            raise ValueError(f"{self.path} holds FID statistics only (mean and covariance); {need_images} need "
                             "the real images: evaluate them without real_stats (real=<shards>), or set "
                             "metrics=[fid] (IS may be added: it has no real side)")
        stats = load_statistics(self.path)
        try:
            metrics["fid"].load_real_statistics(stats)
        except ExtractorMismatchError as err:
            raise ExtractorMismatchError(f"{self.path}: {err} Or delete the file to recompute it.") from err
        self.cached, self.n = True, stats.n

    @property
    def wants_images(self) -> bool:
        """True when the metrics need real images fed (a real side that is not cached)."""
        return self.needed and not self.cached

    def add(self, metrics: MetricCollection, rows: dict[str, torch.Tensor]) -> None:
        """Feed the rows of real images (ldm.metrics.collection.batch_rows) to the metrics."""
        update_from_rows(metrics, rows, real=True)
        self.n += len(next(iter(rows.values())))

    def save(self, metrics: MetricCollection) -> None:
        """Write the real statistics to real_stats when it was given but missing."""
        if self.path is not None and not self.cached:
            save_statistics(self.path, metrics["fid"].real_statistics())
            log.info("cached the real statistics of %d images in %s", self.n, self.path)

    def describe(self) -> dict[str, Any]:
        """The real side as metrics.json records it."""
        source = "cache" if self.cached else ("shards" if self.needed else None)
        return {"source": source, "n": self.n, "stats": None if self.path is None else str(self.path.resolve())}


class PairedScores:
    """Per-image PSNR, SSIM and (when a VGG16 trunk is configured) LPIPS between outputs and
    their ground truth: autoencoder reconstructions, super-resolved or inpainted samples."""

    def __init__(self, cfg: DictConfig, device: torch.device, notes: list[str]):
        self.lpips = None
        if cfg.lpips_weights:
            self.lpips = build_lpips(backbone_weights=cfg.lpips_weights).to(device)
        else:
            notes.append("lpips skipped: set lpips_weights=<torchvision vgg16 .pth> (or LDM_VGG16_WEIGHTS)")

    @torch.no_grad()
    def rows(self, truth: torch.Tensor, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'psnr', 'ssim'[, 'lpips']}: (N,) scores of outputs (N, 3, H, W) in [-1, 1] against their ground truth."""
        scores = {"psnr": psnr(truth, output).cpu(), "ssim": ssim(truth, output).cpu()}
        if self.lpips is not None:
            scores["lpips"] = self.lpips(truth, output.clamp(-1, 1)).flatten().double().cpu()
        return scores


# ----------------------------------------------------------------------------- what a launch makes


@dataclass
class Part:
    """A sequence of chunk inputs (the same on every rank) and the work that makes one chunk of
    each (ldm.evaluation.chunks); desc / total / unit / size drive rank 0's progress bar."""

    name: str
    inputs: Iterable[Any]
    work: Callable[[Any], dict[str, Any]]
    desc: str
    total: int
    unit: str = "batch"
    size: Callable[[Any], int] = lambda item: 1


# A chunk's input: (index of its first image, its number of images, its batch or None).
Item = tuple[int, int, Any]


def _numbered(batches: Iterable[dict]) -> Iterator[Item]:
    """Real batches as chunk inputs, numbered by their first image."""
    start = 0
    for batch in batches:
        yield start, len(batch["image"]), batch
        start += len(batch["image"])


class Samples:
    """What a chunk of scored images holds besides the rows: `save_png` writes them as PNG files
    now, `save_npz` keeps their pixels in the chunk for samples.npz."""

    def __init__(self, cfg: DictConfig, out: Path):
        self.png = out / "samples" if cfg.save_png else None
        self.npz = bool(cfg.save_npz)

    def keep(self, record: dict[str, Any], images: torch.Tensor) -> None:
        """Save or keep `images`, the chunk's images from index record['start'] on."""
        if self.png is None and not self.npz:
            return
        pixels = images_to_uint8(images).permute(0, 2, 3, 1).cpu()
        if self.png is not None:
            save_pngs(self.png, record["start"], pixels.numpy())
        if self.npz:
            record["pixels"] = pixels


def _real_part(cfg: DictConfig, stream: ShardStream, metrics: MetricCollection, device: torch.device) -> Part:
    def work(batch: dict) -> dict[str, Any]:
        return {"real": batch_rows(metrics, batch["image"].to(device), real=True)}

    return Part("real", make_loader(stream, cfg.num_workers), work, "real images", len(stream))


def _ldm_parts(cfg: DictConfig, model: LatentDiffusion, metrics: MetricCollection, real: RealSide,
               device: torch.device, dtype: torch.dtype | None, run: Path | None, samples: Samples,
               notes: list[str]) -> tuple[list[Part], dict[str, Any]]:
    if cfg.n is None or cfg.n < 1:
        raise ValueError("a latent diffusion run needs n=<number of samples>")
    protocol = SamplingProtocol(cfg.sampler, cfg.steps, float(cfg.guidance), float(cfg.eta), cfg.use_ema)
    protocol.check(model)
    check_caption_metrics(model, list(cfg.metrics))
    image_size = cfg.image_size or model.hparams.image_size
    conditional = model.model.conditioning_key is not None
    parts = []
    if real.wants_images or conditional:
        if conditional and not cfg.real:
            raise ValueError("this model is conditional: pass real=<validation shards>; their captions / labels / "
                             "low-res or masked inputs condition the samples")
        stream = real_stream(cfg, image_size, batch_transforms(cfg, run))
        if real.wants_images:
            parts.append(_real_part(cfg, stream, metrics, device))
    if conditional:  # with the real batch whose conditions the samples take
        inputs = _numbered(condition_chunks(make_loader(stream, cfg.num_workers), cfg.n))
    else:
        inputs = ((s, min(cfg.batch_size, cfg.n - s), None) for s in range(0, cfg.n, cfg.batch_size))
    # Concat-conditioned models (super-resolution, inpainting) have a ground truth per sample.
    paired = PairedScores(cfg, device, notes) if model.model.conditioning_key == "concat" else None
    mask_key = getattr(model.concat_stage, "mask_key", None)
    if mask_key is not None:
        notes.append("inpainting: the known pixels are pasted back into the samples before scoring")
    model.to(device)

    def work(item: Item) -> dict[str, Any]:
        start, size, part = item
        begin = time.perf_counter()
        with autocast(device, dtype):
            images = generate(model, part, size, image_size, range(cfg.seed + start, cfg.seed + start + size),
                              protocol)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record: dict[str, Any] = {"start": start, "n": size, "seconds": time.perf_counter() - begin}
        images = images.float()
        if paired is not None:
            truth = part["image"].to(device)
            if mask_key is not None:
                images = paste_known(truth, images, part[mask_key].to(device))
            record["paired"] = paired.rows(truth, images)
        captions = sample_captions(model, part)
        record.update(fake=batch_rows(metrics, images, real=False, captions=captions), captions=captions)
        samples.keep(record, images)
        return record

    parts.append(Part("samples", inputs, work, "generating", cfg.n, "img", lambda item: item[1]))
    return parts, {"image_size": image_size}


def _autoencoder_parts(cfg: DictConfig, module, metrics: MetricCollection, real: RealSide, device: torch.device,
                       dtype: torch.dtype | None, samples: Samples, notes: list[str]
                       ) -> tuple[list[Part], dict[str, Any]]:
    if isinstance(module, FirstStage):  # a released autoencoder (reference_config=)
        first_stage, trained_size = module, module.ddconfig["resolution"]
    else:
        first_stage = module.first_stage
        if getattr(module, "ema", None) is not None:
            module.ema.copy_to(first_stage)  # the weights validation and the LDM stage use
        trained_size = (module.build_config or {}).get("first_stage", {}).get("resolution")
    first_stage.to(device).eval()
    image_size = cfg.image_size or trained_size
    if not image_size:
        raise ValueError("the run does not record its training resolution: pass image_size=<px>")
    stream = real_stream(cfg, image_size, [])
    n = stream.samples_per_rank if cfg.n is None else cfg.n
    if n > stream.samples_per_rank:
        raise ValueError(f"real= holds {stream.samples_per_rank} images (n_real={cfg.n_real}), fewer than n={n} "
                         "to reconstruct: lower n, or n=null for all of them")
    paired = PairedScores(cfg, device, notes)

    def inputs() -> Iterator[Item]:  # the real side takes every image, the reconstructions n
        for item in _numbered(make_loader(stream, cfg.num_workers)):
            if item[0] >= n and not real.wants_images:
                return
            yield item

    def work(item: Item) -> dict[str, Any]:
        start, _, batch = item
        x = batch["image"].to(device)
        record: dict[str, Any] = {"start": start, "n": 0}
        if real.wants_images:
            record["real"] = batch_rows(metrics, x, real=True)
        x = x[:max(n - start, 0)]
        if len(x):
            with torch.no_grad(), autocast(device, dtype):
                rec = first_stage.decode(first_stage.encode(x).mode())
            rec = rec.float().clamp(-1, 1)
            captions = batch["caption"][:len(x)]
            record.update(n=len(x), fake=batch_rows(metrics, rec, real=False, captions=captions), captions=captions,
                          paired=paired.rows(x, rec))
            samples.keep(record, rec)
        return record

    return [Part("samples", inputs(), work, "reconstructing", len(stream))], {"image_size": image_size}


def _images_parts(cfg: DictConfig, metrics: MetricCollection, real: RealSide, device: torch.device
                  ) -> tuple[list[Part], dict[str, Any]]:
    given = GivenImages(cfg.images)
    n = len(given) if cfg.n is None else cfg.n
    if n > len(given):
        raise ValueError(f"images={cfg.images} holds {len(given)} images, fewer than n={n}: lower n, or n=null")
    image_size = cfg.image_size or given.width
    parts = [_real_part(cfg, real_stream(cfg, image_size, []), metrics, device)] if real.wants_images else []

    def work(item: Item) -> dict[str, Any]:
        start, size, _ = item  # read here: other ranks' batches are never read
        return {"start": start, "n": size, "fake": batch_rows(metrics, given.batch(start, size).to(device), real=False)}

    inputs = ((s, min(cfg.batch_size, n - s), None) for s in range(0, n, cfg.batch_size))
    parts.append(Part("samples", inputs, work, "given images", -(-n // cfg.batch_size)))
    return parts, {"image_size": image_size}


def _run_parts(parts: list[Part], store: ChunkStore, ranks: Ranks) -> dict[str, int]:
    """Make this rank's chunks of every part; {part: number of chunks}."""
    counts = {}
    for part in parts:
        with tqdm(total=part.total, desc=part.desc, unit=part.unit, disable=not ranks.is_zero) as bar:
            counts[part.name] = run_part(store, part.name, part.inputs, part.work, ranks, bar, part.size)
    return counts


def _reduce(store: ChunkStore, counts: dict[str, int], metrics: MetricCollection, real: RealSide,
            keep_features: bool = False) -> dict[str, Any]:
    """Feed every chunk's rows to the metrics, in chunk order; the samples' count, generation
    seconds and paired scores (and, with keep_features, the per-image FID features of both sides)."""
    n, seconds, paired = 0, 0.0, {}
    kept: dict[str, list[torch.Tensor]] = {"real": [], "fake": []}
    key = metrics["fid"].row_key if "fid" in metrics else None
    for part, count in counts.items():
        for record in store.records(part, count):
            if "real" in record:
                real.add(metrics, record["real"])
                if keep_features and key in record["real"]:
                    kept["real"].append(record["real"][key])
            if not record.get("n"):
                continue
            if record["start"] != n:
                raise RuntimeError(f"{store.folder}: a {part} chunk starts at image {record['start']}, not {n}: "
                                   "the folder mixes chunks of different evaluations; evaluate into a new folder")
            update_from_rows(metrics, record["fake"], real=False, captions=record.get("captions"))
            if keep_features and key in record["fake"]:
                kept["fake"].append(record["fake"][key])
            n += record["n"]
            seconds += record.get("seconds", 0.0)
            for name, values in record.get("paired", {}).items():
                paired.setdefault(name, []).append(values)
    return {"n": n, "seconds": seconds, "paired": {k: float(torch.cat(v).mean()) for k, v in paired.items()},
            "features": {side: torch.cat(rows) if rows else None for side, rows in kept.items()}}


def _fid_interval(cfg: DictConfig, metrics: MetricCollection, features: dict[str, torch.Tensor | None],
                  name: str) -> dict[str, float]:
    """`fid_bootstrap` resamples of the generated (and, when their features are at hand rather than
    cached statistics, the real) images' features: a 95 % interval of the FID (ldm.metrics.bootstrap)."""
    mu, sigma, _ = metrics["fid"].statistics(real=True)
    interval = bootstrap_fid(features["fake"], mu, sigma, real=features["real"], resamples=cfg.fid_bootstrap,
                             seed=cfg.seed)
    return {f"{name}_low": interval.low, f"{name}_high": interval.high, f"{name}_std": interval.std}


# ----------------------------------------------------------------------------- entry


def _checkpoint_step(path: Path) -> int | None:
    # mmap: only the few bytes of the step are read, not the weights a second time.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")


def _load(cfg: DictConfig) -> tuple[Any, dict[str, Any], Path | None]:
    """The module cfg.ckpt names, metrics.json's `run` entry, and the training run folder (if any)."""
    if cfg.reference_config:  # a released checkpoint with its YAML (docs/checkpoints.md)
        ckpt, run = Path(cfg.ckpt), None
        module = load_reference(ckpt, cfg.reference_config, **dict(cfg.reference_overrides or {}))
        described = describe_model(module) if isinstance(module, LatentDiffusion) else \
            {"f": module.downsampling_factor, "first_stage": first_stage_kind(module)}
        described["reference_config"] = str(Path(cfg.reference_config).resolve())
    else:
        ckpt = find_checkpoint(cfg.ckpt)
        module = load_module(ckpt, trust_config=cfg.trust_config)
        run = run_folder(cfg.ckpt)
        described = describe_model(module)
    if not isinstance(module, (LatentDiffusion, FirstStage)) and not hasattr(module, "first_stage"):
        raise ValueError(f"{ckpt} holds a {type(module).__name__}; evaluate.py takes latent diffusion and "
                         "autoencoder runs")
    info = {"ckpt": str(ckpt.resolve()), "run_dir": None if run is None else str(run),
            "global_step": _checkpoint_step(ckpt), **described}
    return module, info, run


def _check_arguments(cfg: DictConfig) -> str:
    """What cfg asks for ('ckpt', 'images' or 'real_stats'), refusing what cannot work."""
    if cfg.ckpt and cfg.images:
        raise ValueError("pass exactly one of ckpt=<run folder or .ckpt> and images=<folder or .npz>")
    kind = "ckpt" if cfg.ckpt else "images" if cfg.images else "real_stats"
    if kind == "real_stats" and not (cfg.real and cfg.real_stats and cfg.image_size):
        raise ValueError("pass exactly one of ckpt=<run folder or .ckpt> and images=<folder or .npz>, or only "
                         "real=<shards> real_stats=<.npz> image_size=<px of the samples they will score> to "
                         "compute and cache the real images' FID statistics")
    if kind == "images" and set(cfg.metrics) & set(CAPTION_METRICS):
        raise ValueError(f"{sorted(set(cfg.metrics) & set(CAPTION_METRICS))} need the captions the images were "
                         "generated from, which images= does not carry: evaluate the text model's run (ckpt=) instead")
    if kind != "ckpt" and (cfg.save_png or cfg.save_npz):
        raise ValueError("save_png / save_npz keep the images a run makes (samples, reconstructions); with "
                         f"{'images=' if kind == 'images' else 'real_stats alone'} there are none: drop them")
    return kind


def _file_identity(path: str | Path) -> dict[str, Any]:
    """What tells a file (or a folder's files) from a rewritten one: path, bytes, newest modification."""
    path = Path(path)
    stats = [p.stat() for p in ([path] if path.is_file() else sorted(path.iterdir())) if p.is_file()]
    return {"path": str(path.resolve()), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _settings(cfg: DictConfig, extractors: list, run: dict[str, Any] | None) -> dict[str, Any]:
    """What the chunks depend on (a continuing evaluation must match it; see CONTINUABLE): the
    settings, the feature networks, and the checkpoint or given images as files (a checkpoint
    rewritten since, e.g. a newer last.ckpt, is another model)."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in CONTINUABLE}
    settings["features"] = [None if e is None else {"name": e.name, "settings": e.settings} for e in extractors]
    settings["model"] = None if run is None else {**_file_identity(run["ckpt"]), "global_step": run["global_step"]}
    settings["images"] = _file_identity(cfg.images) if cfg.images else None
    return settings


def evaluate(cfg: DictConfig) -> Path | None:
    """Evaluate what cfg names (ckpt=, images=, or real= with real_stats= alone) and write
    metrics.json into cfg.out_dir; returns its path (None on ranks other than 0, which only make
    their share of the chunks)."""
    kind = _check_arguments(cfg)
    ranks = start_ranks(cfg.rank_timeout_s)
    try:
        return _evaluate(cfg, kind, ranks)
    finally:
        ranks.close()


def _evaluate(cfg: DictConfig, kind: str, ranks: Ranks) -> Path | None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.world > 1:  # train.py's start-up checks (ldm/cli/launch.py)
        launch.check_same_run_folder(dist.group.WORLD, out)
        launch.check_shared_run_folder(dist.group.WORLD, out, cfg.shared_fs_timeout_s, SHARES)
    device = rank_device(cfg.device, ranks)
    names = ["fid"] if kind == "real_stats" else list(cfg.metrics)
    extractor, logits = build_extractors(cfg.features, names)
    metrics = build_metrics(names, extractor, logits, kid_subsets=cfg.kid_subsets,
                            kid_subset_size=cfg.kid_subset_size, is_splits=cfg.is_splits, pr_k=cfg.pr_k,
                            classifier=cfg.classifier, clip_model=cfg.clip_model).to(device)
    real = RealSide(cfg, metrics, names)
    ranks.check_same(real.cached, f"whether real_stats={cfg.real_stats} exists: put it on a filesystem all nodes share")
    record, parts, notes = _plan(cfg, kind, metrics, real, device, out)

    store = ChunkStore(out)
    settings = _settings(cfg, [extractor, logits], record["run"])
    ranks.check_same(json.dumps(settings, sort_keys=True), "the evaluation's settings")
    found = ranks.on_zero(lambda: store.adopt_settings(settings))
    if found:
        log.info("continuing the evaluation in %s: %d chunks were made earlier", out, found)
    counts = _run_parts(parts, store, ranks)
    ranks.barrier()
    ranks.close()  # the metrics are computed by rank 0 alone, from the chunks: no synchronisation over ranks
    if not ranks.is_zero:
        return None
    for part, count in counts.items():
        store.finish(part, count)
    return _write_results(cfg, out, store, counts, metrics, real, record, notes, extractor, ranks.world)


def _plan(cfg: DictConfig, kind: str, metrics: MetricCollection, real: RealSide, device: torch.device, out: Path
          ) -> tuple[dict[str, Any], list[Part], list[str]]:
    """metrics.json's record so far (kind, run, image size), the parts to make, and notes."""
    dtype = autocast_dtype(cfg.precision, device)
    notes: list[str] = []
    record: dict[str, Any] = {"run": None, "kind": kind}
    if kind == "images":
        parts, info = _images_parts(cfg, metrics, real, device)
    elif kind == "real_stats":
        parts = [] if real.cached else [_real_part(cfg, real_stream(cfg, cfg.image_size, []), metrics, device)]
        info = {"image_size": cfg.image_size}
    else:
        module, record["run"], run = _load(cfg)
        samples = Samples(cfg, out)
        if isinstance(module, LatentDiffusion):
            record["kind"] = "ldm"
            parts, info = _ldm_parts(cfg, module, metrics, real, device, dtype, run, samples, notes)
        else:
            record["kind"] = "autoencoder"
            parts, info = _autoencoder_parts(cfg, module, metrics, real, device, dtype, samples, notes)
    return {**record, **info}, parts, notes


def _write_results(cfg: DictConfig, out: Path, store: ChunkStore, counts: dict[str, int], metrics: MetricCollection,
                   real: RealSide, record: dict[str, Any], notes: list[str], extractor, world: int) -> Path:
    """Compute the metrics from the chunks; write metrics.json (and real_stats, samples.npz)."""
    bootstrap = bool(cfg.fid_bootstrap) and "fid" in metrics and record["kind"] != "real_stats"
    totals = _reduce(store, counts, metrics, real, keep_features=bootstrap)
    real.save(metrics)
    values: dict[str, float] = {}
    if record["kind"] != "real_stats":
        values = {k: float(v) for k, v in metrics.compute().items()}
        if record["kind"] == "autoencoder":
            values = {("rfid" if k == "fid" else k): v for k, v in values.items()}  # the paper's name
        if bootstrap:
            values.update(_fid_interval(cfg, metrics, totals["features"], "rfid" if record["kind"] == "autoencoder"
                                        else "fid"))
        values.update(totals["paired"])
        record["n"] = totals["n"]
        if record["kind"] == "ldm":
            record["samples_per_s"] = totals["n"] / totals["seconds"]  # per rank: seconds of one device
    if cfg.save_npz:
        pixels = (r["pixels"].numpy() for r in store.records("samples", counts["samples"]) if r.get("n"))
        write_npz(out / "samples.npz", pixels, totals["n"], record["image_size"], record["image_size"])
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "out_dir"}
    record.update(metrics=values, real=real.describe(),
                  features=None if extractor is None else {"name": extractor.name, "settings": extractor.settings},
                  settings=settings, notes=notes, world_size=world,
                  written=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    path = out / "metrics.json"
    path.write_text(json.dumps(record, indent=1))
    for note in notes:
        log.info(note)
    if values:
        log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return path
