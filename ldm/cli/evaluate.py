"""The logic behind evaluate.py: FID-type metrics of a latent diffusion run, reconstruction
metrics of an autoencoder run, or the scores of given images, written to metrics.json.

- latent diffusion run (`ckpt=`): n samples under the conditions of the real batches
  (ldm.evaluation.protocol), scored against the real images; super-resolution and
  inpainting samples also against their own ground truth (PSNR, SSIM, LPIPS), inpainting
  samples with the known pixels pasted back;
- autoencoder run (`ckpt=`): the first n real images reconstructed (posterior mode, EMA weights
  when the run kept them); rFID (and the other metrics asked for), PSNR, SSIM, LPIPS;
- a released checkpoint (`ckpt=` the file, `reference_config=` its YAML): either of the above;
- `images=`: a folder of PNG/JPEG files or an .npz (N, H, W, 3) uint8 array, scored as they are.

Text-alignment metrics (prompt_accuracy, clip_score) score text models' samples against the
captions of the real batches they were generated under, and autoencoder reconstructions against
their images' captions; given images carry no captions.

The real side is `real` (shards) or the FID statistics cached in `real_stats`: read when the file
exists (FID only: the other real-side metrics need the images), else computed from `real` and
written there for the next run. A cache from another feature extractor is refused.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchmetrics import MetricCollection
from tqdm import tqdm

from ldm.data.pipeline import SampleDecoder, ShardStream, make_loader
from ldm.data.transforms import ImageTransform
from ldm.evaluation.describe import describe_model, first_stage_kind
from ldm.evaluation.protocol import (SamplingProtocol, build_extractors, check_caption_metrics, condition_chunks,
                                     generate, sample_captions)
from ldm.metrics.collection import CAPTION_METRICS, NO_REAL_SIDE, build_metrics
from ldm.metrics.fid import ExtractorMismatchError, load_statistics, save_statistics
from ldm.metrics.lpips import build_lpips
from ldm.metrics.reconstruction import psnr, ssim
from ldm.convert.reference import load_reference
from ldm.first_stage.base import FirstStage
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.modules.loading import find_checkpoint, load_module
from ldm.utils.trusted_config import check_trusted
from ldm.nets.concat import paste_known

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# What a run folder's data.batch_transforms may build without trust_config (configs/cond).
BATCH_TRANSFORM_TARGETS = frozenset({
    "ldm.data.degradations.SRDegradation",
    "ldm.data.degradations.InpaintingDegradation",
    "ldm.data.degradations.MaskGenerator",
})


# ----------------------------------------------------------------------------- inputs


def image_files(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return files


def _npz_images(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        key = next((k for k in ("images", "arr_0") if k in data.files), None)
        if key is None:
            raise ValueError(f"{path} holds {data.files}; expected the images as `images` or `arr_0` "
                             "(N, H, W, 3) uint8, the layout of the ADM / guided-diffusion sample files")
        array = data[key]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{path}[{key!r}] is {array.dtype} {array.shape}; expected (N, H, W, 3) uint8")
    return array


def count_images(path: str | Path) -> int:
    """How many images `images=` holds."""
    path = Path(path)
    return len(image_files(path)) if path.is_dir() else len(_npz_images(path))


def image_batches(path: str | Path, batch_size: int, n: int) -> Iterator[torch.Tensor]:
    """The first n images of a folder or .npz as uint8 (B, 3, H, W) batches."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"images={path} does not exist; pass a folder of PNG files or an .npz")
    if path.is_dir():
        files = image_files(path)[:n]
        for start in range(0, len(files), batch_size):
            arrays = []
            for file in files[start:start + batch_size]:
                with Image.open(file) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            sizes = {a.shape for a in arrays}
            if len(sizes) > 1:
                raise ValueError(f"images in {path} differ in size ({sorted(sizes)}); resize them to one size first")
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    else:
        array = _npz_images(path)[:n]
        for start in range(0, len(array), batch_size):
            yield torch.from_numpy(array[start:start + batch_size]).permute(0, 3, 1, 2).contiguous()


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

    def update(self, metrics: MetricCollection, images: torch.Tensor) -> None:
        """Feed real images to the metrics, when they want them."""
        if self.wants_images:
            metrics.update(images, real=True)
            self.n += len(images)

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
    """Mean per-image PSNR, SSIM and (when a VGG16 trunk is configured) LPIPS between outputs and
    their ground truth: autoencoder reconstructions, super-resolved or inpainted samples."""

    def __init__(self, cfg: DictConfig, device: torch.device, notes: list[str]):
        self.lpips = None
        if cfg.lpips_weights:
            self.lpips = build_lpips(backbone_weights=cfg.lpips_weights).to(device)
        else:
            notes.append("lpips skipped: set lpips_weights=<torchvision vgg16 .pth> (or LDM_VGG16_WEIGHTS)")
        self.scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], **({"lpips": []} if self.lpips else {})}

    @torch.no_grad()
    def update(self, truth: torch.Tensor, output: torch.Tensor) -> None:
        """Score a batch of outputs (N, 3, H, W) in [-1, 1] against their ground truth."""
        self.scores["psnr"].append(psnr(truth, output).cpu())
        self.scores["ssim"].append(ssim(truth, output).cpu())
        if self.lpips is not None:
            self.scores["lpips"].append(self.lpips(truth, output.clamp(-1, 1)).flatten().double().cpu())

    def compute(self) -> dict[str, float]:
        """{'psnr', 'ssim'[, 'lpips']}: means over all images."""
        return {k: float(torch.cat(v).mean()) for k, v in self.scores.items()}


def _add_reals(cfg: DictConfig, stream: ShardStream, real: RealSide, metrics: MetricCollection,
               device: torch.device) -> None:
    for batch in tqdm(make_loader(stream, cfg.num_workers), total=len(stream), desc="real images", unit="batch"):
        real.update(metrics, batch["image"].to(device))


# ----------------------------------------------------------------------------- the three kinds


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(cfg: DictConfig, device: torch.device):
    dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[str(cfg.precision)]
    if dtype is not None and device.type != "cuda":
        raise ValueError(f"precision={cfg.precision} needs a GPU; use precision=32 on the CPU")
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _evaluate_ldm(cfg: DictConfig, model: LatentDiffusion, metrics: MetricCollection, real: RealSide,
                  device: torch.device, run: Path | None, notes: list[str]) -> dict[str, Any]:
    if cfg.n is None or cfg.n < 1:
        raise ValueError("a latent diffusion run needs n=<number of samples>")
    protocol = SamplingProtocol(cfg.sampler, cfg.steps, float(cfg.guidance), float(cfg.eta), cfg.use_ema)
    protocol.check(model)
    check_caption_metrics(model, list(cfg.metrics))
    image_size = cfg.image_size or model.hparams.image_size
    conditional = model.model.conditioning_key is not None
    stream = None
    if real.wants_images or conditional:
        if conditional and not cfg.real:
            raise ValueError("this model is conditional: pass real=<validation shards>; their captions / labels / "
                             "low-res or masked inputs condition the samples")
        stream = real_stream(cfg, image_size, batch_transforms(cfg, run))
    if real.wants_images:
        _add_reals(cfg, stream, real, metrics, device)
    if conditional:  # (size, real batch whose conditions the samples take)
        parts = ((len(p["image"]), p) for p in condition_chunks(make_loader(stream, cfg.num_workers), cfg.n))
    else:
        parts = ((min(cfg.batch_size, cfg.n - s), None) for s in range(0, cfg.n, cfg.batch_size))
    # Concat-conditioned models (super-resolution, inpainting) have a ground truth per sample.
    paired = PairedScores(cfg, device, notes) if model.model.conditioning_key == "concat" else None
    mask_key = getattr(model.concat_stage, "mask_key", None)
    if mask_key is not None:
        notes.append("inpainting: the known pixels are pasted back into the samples before scoring")
    model.to(device)
    seconds, done = 0.0, 0
    with tqdm(total=cfg.n, desc="generating", unit="img") as bar:
        for size, part in parts:
            seeds = range(cfg.seed + done, cfg.seed + done + size)
            start = time.perf_counter()
            with _autocast(cfg, device):
                images = generate(model, part, size, image_size, seeds, protocol)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            images = images.float()
            if paired is not None:
                truth = part["image"].to(device)
                if mask_key is not None:
                    images = paste_known(truth, images, part[mask_key].to(device))
                paired.update(truth, images)
            metrics.update(images, real=False, captions=sample_captions(model, part))
            done += size
            bar.update(size)
    record = {"n": done, "image_size": image_size, "samples_per_s": done / seconds}
    return record if paired is None else {**record, "paired": paired.compute()}


def _evaluate_autoencoder(cfg: DictConfig, module, metrics: MetricCollection, real: RealSide,
                          device: torch.device, notes: list[str]) -> dict[str, Any]:
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
    done = 0
    for batch in tqdm(make_loader(stream, cfg.num_workers), total=len(stream), desc="reconstructing", unit="batch"):
        x = batch["image"].to(device)
        real.update(metrics, x)
        x = x[:n - done]
        if not len(x):
            continue
        with torch.no_grad(), _autocast(cfg, device):
            rec = first_stage.decode(first_stage.encode(x).mode())
        rec = rec.float().clamp(-1, 1)
        metrics.update(rec, real=False, captions=batch["caption"][:len(x)])
        paired.update(x, rec)
        done += len(x)
    return {"n": done, "image_size": image_size, "paired": paired.compute()}


def _evaluate_images(cfg: DictConfig, metrics: MetricCollection, real: RealSide,
                     device: torch.device) -> dict[str, Any]:
    available = count_images(cfg.images)
    n = available if cfg.n is None else cfg.n
    if n > available:
        raise ValueError(f"images={cfg.images} holds {available} images, fewer than n={n}: lower n, or n=null")
    done, image_size = 0, cfg.image_size
    for batch in tqdm(image_batches(cfg.images, cfg.batch_size, n), total=-(-n // cfg.batch_size),
                      desc="given images", unit="batch"):
        metrics.update(batch.to(device), real=False)
        image_size = image_size or batch.shape[-1]
        done += len(batch)
    if real.wants_images:
        _add_reals(cfg, real_stream(cfg, image_size, []), real, metrics, device)
    return {"n": done, "image_size": image_size}


# ----------------------------------------------------------------------------- entry


def _checkpoint_step(path: Path) -> int | None:
    # mmap: only the few bytes of the step are read, not the weights a second time.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate what cfg names (ckpt= or images=) and write metrics.json into cfg.out_dir; returns its path."""
    if bool(cfg.ckpt) == bool(cfg.images):
        raise ValueError("pass exactly one of ckpt=<run folder or .ckpt> and images=<folder or .npz>")
    names = list(cfg.metrics)
    if cfg.images and set(names) & set(CAPTION_METRICS):
        raise ValueError(f"{sorted(set(names) & set(CAPTION_METRICS))} need the captions the images were generated "
                         "from, which images= does not carry: evaluate the text model's run (ckpt=) instead")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    extractor, logits = build_extractors(cfg.features, names)
    metrics = build_metrics(names, extractor, logits, kid_subsets=cfg.kid_subsets,
                            kid_subset_size=cfg.kid_subset_size, is_splits=cfg.is_splits, pr_k=cfg.pr_k,
                            classifier=cfg.classifier, clip_model=cfg.clip_model).to(device)
    real = RealSide(cfg, metrics, names)
    notes: list[str] = []
    record: dict[str, Any] = {"run": None}
    if cfg.images:
        record.update(kind="images", **_evaluate_images(cfg, metrics, real, device))
    else:
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
        record["run"] = {"ckpt": str(ckpt.resolve()), "run_dir": None if run is None else str(run),
                         "global_step": _checkpoint_step(ckpt), **described}
        if isinstance(module, LatentDiffusion):
            record.update(kind="ldm", **_evaluate_ldm(cfg, module, metrics, real, device, run, notes))
        elif isinstance(module, FirstStage) or hasattr(module, "first_stage"):
            record.update(kind="autoencoder", **_evaluate_autoencoder(cfg, module, metrics, real, device, notes))
        else:
            raise ValueError(f"{ckpt} holds a {type(module).__name__}; evaluate.py takes latent diffusion and "
                             "autoencoder runs")
    values = {k: float(v) for k, v in metrics.compute().items()}
    if record["kind"] == "autoencoder":
        values = {("rfid" if k == "fid" else k): v for k, v in values.items()}  # the paper's name
    values.update(record.pop("paired", {}))
    real.save(metrics)
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "out_dir"}
    record.update(metrics=values, real=real.describe(),
                  features=None if extractor is None else {"name": extractor.name, "settings": extractor.settings},
                  settings=settings, notes=notes, written=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    path = out / "metrics.json"
    path.write_text(json.dumps(record, indent=1))
    for note in notes:
        log.info(note)
    log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return path
