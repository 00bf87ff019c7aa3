"""Sample-quality evaluation of a latent diffusion model: the generation protocol shared with
evaluate.py, and a Lightning callback that runs it during training.

The protocol: samples are generated with one sampler setting (`SamplingProtocol`) under the
conditions of real validation batches (captions, class labels, low-res or masked inputs: whatever
the model is conditioned on), so text and class models are scored on the data's own conditions;
sample i uses seed `seed + i`; the real side is the validation images. Metrics come from
ldm.metrics.collection (one `update(images, real)` for all of them; text models' samples also
carry the captions they were generated from, for prompt accuracy and CLIP score).
"""
from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from ldm.data.pipeline import BOOKKEEPING_KEYS
from ldm.first_stage.identity import IdentityFirstStage
from ldm.first_stage.kl import AutoencoderKL
from ldm.first_stage.vq import AutoencoderVQ
from ldm.metrics.collection import CAPTION_METRICS, FEATURE_METRICS, build_metrics
from ldm.metrics.features import FeatureExtractor
from ldm.modules.latent_diffusion import LatentDiffusion

# Batch entries that are never conditions: the target images and the pipeline's bookkeeping.
_NOT_CONDITIONS = ("image", *BOOKKEEPING_KEYS)


@dataclass(frozen=True)
class SamplingProtocol:
    """How evaluation samples are drawn: sampler name, steps, guidance scale, DDIM eta, EMA weights."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 1.0
    eta: float = 0.0
    use_ema: bool = True

    def sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of LatentDiffusion.sample for this protocol."""
        kwargs = {"name": self.sampler, "num_steps": self.steps, "guidance_scale": self.guidance,
                  "use_ema": self.use_ema}
        if self.sampler == "ddim":  # eta is DDIM's; the other samplers take no such argument
            kwargs["eta"] = self.eta
        return kwargs

    def check(self, model: LatentDiffusion) -> None:
        """Refuse settings that cannot mean what they say for `model`."""
        if self.guidance != 1.0 and model.model.conditioning_key in (None, "concat"):
            raise ValueError(f"guidance={self.guidance} needs a condition to drop, and this model is "
                             f"{'unconditional' if model.model.conditioning_key is None else 'concat-conditioned'}; "
                             "use guidance=1 (it would only double the cost)")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise ValueError(f"eta is a DDIM setting; sampler={self.sampler!r} does not take it (set eta=0)")


def build_extractors(features: Mapping[str, Any], metric_names: Sequence[str]
                     ) -> tuple[FeatureExtractor | None, FeatureExtractor | None]:
    """The extractor described by `features` (a configs/features node with `_target_`) and, when
    IS is among `metric_names`, the same network's class logits (output='logits'). (None, None)
    when no metric uses a feature network, so none is loaded."""
    if not set(metric_names) & set(FEATURE_METRICS):
        return None, None
    if "is" not in metric_names:
        return instantiate(features), None
    target = features["_target_"]
    if "output" not in inspect.signature(get_class(target)).parameters:  # checked before loading any weights
        raise ValueError(f"IS needs class logits, which {target} does not give: evaluate IS with "
                         "features=inception (or features=toy for toy runs), the other metrics separately")
    return instantiate(features), instantiate(features, output="logits")


def first_stage_kind(first_stage: torch.nn.Module) -> str:
    """'kl', 'vq' or 'identity' (the paper's first-stage families), else the class name."""
    kinds = {AutoencoderKL: "kl", AutoencoderVQ: "vq", IdentityFirstStage: "identity"}
    return next((name for cls, name in kinds.items() if isinstance(first_stage, cls)), type(first_stage).__name__)


def describe_model(module: pl.LightningModule) -> dict[str, Any]:
    """What the tables group runs by: downsampling factor f, first-stage kind and, for latent
    diffusion, the conditioning (key and batch entry)."""
    if isinstance(module, LatentDiffusion):
        first_stage = module.first_stage_model
        key = module.model.conditioning_key
        return {"f": first_stage.downsampling_factor, "first_stage": first_stage_kind(first_stage),
                "conditioning": key, "cond_key": module.hparams.cond_stage_key if key else None}
    first_stage = module.first_stage
    return {"f": first_stage.downsampling_factor, "first_stage": first_stage_kind(first_stage)}


def check_caption_metrics(model: LatentDiffusion, metric_names: Sequence[str]) -> None:
    """Refuse text-alignment metrics (prompt_accuracy, clip_score) for a model not conditioned on captions."""
    asked = sorted(set(metric_names) & set(CAPTION_METRICS))
    if asked and (model.model.conditioning_key is None or model.hparams.cond_stage_key != "caption"):
        raise ValueError(f"{asked} score samples against the captions they were generated from, and this model "
                         f"is conditioned on {model.hparams.cond_stage_key if model.model.conditioning_key else 'nothing'}"
                         "; use them with text-conditional models")


def sample_captions(model: LatentDiffusion, batch: Mapping[str, Any] | None) -> list[str] | None:
    """The captions the samples generated under `batch` are conditioned on (text models), else None."""
    if batch is None or model.model.conditioning_key is None or model.hparams.cond_stage_key != "caption":
        return None
    return list(batch["caption"])


def take(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first n samples of a batch dict (tensors with a batch dimension and lists)."""
    return {k: v[:n] for k, v in batch.items()
            if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim > 0)}


def conditions(model: LatentDiffusion, batch: Mapping[str, Any]) -> dict[str, Any] | None:
    """The condition inputs of a real batch for `model` (everything but the images), or None for
    an unconditional model. Refuses data that lacks the conditions the model needs."""
    if model.model.conditioning_key is None:
        return None
    cond = {k: v for k, v in batch.items() if k not in _NOT_CONDITIONS}
    key = model.hparams.cond_stage_key
    if model.model.conditioning_key != "concat" and key not in cond:
        raise KeyError(f"the model is conditioned on {key!r}, which the real batches lack")
    if key == "caption" and not any(cond["caption"]):
        raise ValueError("the real batches have only empty captions (the null condition): "
                         "a text model must be evaluated on data with captions (.txt members)")
    return cond


def condition_chunks(batches: Iterable[dict], total: int) -> Iterator[dict]:
    """Real batches cut so that exactly `total` samples come out, cycling over `batches` (re-iterated)
    when it holds fewer. Raises when `batches` yields nothing."""
    produced = 0
    while produced < total:
        before = produced
        for batch in batches:
            part = take(batch, min(len(batch["image"]), total - produced))
            produced += len(part["image"])
            yield part
            if produced >= total:
                return
        if produced == before:
            raise RuntimeError("the real data yielded no batch: evaluation needs at least one real batch "
                               "(on every rank) for the conditions")


def generate(model: LatentDiffusion, batch: Mapping[str, Any] | None, n: int, image_size: int,
             seeds: Sequence[int], protocol: SamplingProtocol) -> torch.Tensor:
    """n images in [-1, 1] under the conditions of the real `batch` (None: unconditional), image i
    from seeds[i], drawn as `protocol` says."""
    cond = conditions(model, batch) if batch is not None else None
    images = model.sample(cond, n=n, image_size=image_size, seeds=list(seeds), progress=False,
                          **protocol.sample_kwargs())
    # decoders may overshoot; the images scored are the images one would save (clamped, like PNGs)
    return images.clamp(-1, 1)


class EvaluationCallback(pl.Callback):
    """Every `every_n_steps` optimiser steps and at the end of training, generate `num_samples`
    images (split over the DDP ranks, conditions from each rank's share of the datamodule's
    validation data), compute `metrics` against the validation images synchronised over all ranks,
    log them as `eval/<name>` and append one JSON line per evaluation to <run>/metrics/eval.jsonl.

    features: a feature-extractor config (a configs/features node with `_target_`), built here so
        IS can use the same network's logits. The validation images' features are computed once,
        at the first evaluation, and kept.
    sampler, steps, guidance, eta, use_ema: the sampling protocol (SamplingProtocol).
    seed: sample j of rank r uses seed + r + world_size * j, so the images are those of seeds
        seed .. seed + num_samples - 1 whatever the number of ranks.
    kid_subsets, kid_subset_size, is_splits, pr_k: metric settings (ldm.metrics.collection).
    classifier: the shape classifier folder of prompt_accuracy; clip_model: the CLIP model (folder or
        hub name) of clip_score. Both score the samples against the captions they were generated from.
    """

    def __init__(self, features: Mapping[str, Any], every_n_steps: int = 5000, num_samples: int = 1000,
                 metrics: Sequence[str] = ("fid",), sampler: str = "ddim", steps: int = 50, guidance: float = 1.0,
                 eta: float = 0.0, use_ema: bool = True, seed: int = 0, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, is_splits: int = 10, pr_k: int = 3, classifier: str | None = None,
                 clip_model: str | None = None):
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"every_n_steps and num_samples must be >= 1, got {every_n_steps} and {num_samples}")
        self.features = OmegaConf.to_container(features, resolve=True) if OmegaConf.is_config(features) \
            else dict(features)
        self.metric_names = list(metrics)
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.protocol = SamplingProtocol(sampler, steps, float(guidance), float(eta), use_ema)
        self.metric_settings = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
                                "is_splits": is_splits, "pr_k": pr_k, "classifier": classifier,
                                "clip_model": clip_model}
        self.metrics = None
        self._extractor_name: str | None = None  # None: no metric uses a feature network
        self._n_real = 0  # validation images on the real side, all ranks (counted at the first evaluation)
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, LatentDiffusion):
            raise TypeError(f"EvaluationCallback evaluates latent diffusion models, not {type(pl_module).__name__} "
                            "(autoencoders log val/rfid, val/psnr and val/ssim themselves)")
        if self.num_samples < trainer.world_size:
            raise ValueError(f"num_samples={self.num_samples} is below the {trainer.world_size} ranks: "
                             "every rank must generate at least one sample")
        self.protocol.check(pl_module)
        check_caption_metrics(pl_module, self.metric_names)
        extractor, logits = build_extractors(self.features, self.metric_names)
        self._extractor_name = extractor.name if extractor is not None else None
        # The real side is computed once and kept across evaluations.
        self.metrics = build_metrics(self.metric_names, extractor, logits, reset_real_features=False,
                                     **self.metric_settings)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # step > 0: with gradient accumulation the first batches end before the first step.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._run(trainer, pl_module)

    def _val_batches(self, trainer: pl.Trainer) -> Iterable[dict]:
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else []
        if isinstance(loader, (list, tuple)):  # [] is Lightning's "no validation data"
            raise ValueError("EvaluationCallback takes its real images and conditions from the datamodule's "
                             "validation data: set data.val_urls")
        return loader

    def _add_reals(self, trainer: pl.Trainer, device: torch.device, batches: Iterable[dict]) -> int:
        """Feed this rank's validation images to the metrics; the total over ranks."""
        count = 0
        for batch in batches:
            self.metrics.update(batch["image"].to(device), real=True)
            count += len(batch["image"])
        counts = trainer.strategy.all_gather(torch.tensor(count, device=device)).reshape(-1)
        # Checked on every rank before any metric sync, so a starved rank fails them all, not hangs.
        if int(counts.min()) == 0:
            raise RuntimeError(f"some ranks got no validation batch (images per rank: {counts.tolist()}); "
                               "write more validation samples than there are ranks")
        return int(counts.sum())

    @torch.no_grad()
    def _run(self, trainer: pl.Trainer, pl_module: LatentDiffusion) -> None:
        self._last_step = trainer.global_step
        device = pl_module.device
        self.metrics.to(device)
        batches = self._val_batches(trainer)
        if not self._n_real:
            self._n_real = self._add_reals(trainer, device, batches)
        rank, world = trainer.global_rank, trainer.world_size
        n_local = self.num_samples // world + int(rank < self.num_samples % world)
        was_training = pl_module.training
        pl_module.eval()
        start, done = time.perf_counter(), 0
        try:
            for part in condition_chunks(batches, n_local):
                size = len(part["image"])
                seeds = [self.seed + rank + world * j for j in range(done, done + size)]
                images = generate(pl_module, part, size, part["image"].shape[-1], seeds, self.protocol)
                self.metrics.update(images.float(), real=False, captions=sample_captions(pl_module, part))
                done += size
        finally:
            pl_module.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = trainer.strategy.all_gather(torch.tensor(time.perf_counter() - start, device=device))
        values = {k: float(v) for k, v in self.metrics.compute().items()}  # synchronised over ranks
        self.metrics.reset()
        self._record(trainer, pl_module, values, self.num_samples / float(seconds.max()))

    def _record(self, trainer: pl.Trainer, pl_module: LatentDiffusion, values: dict[str, float],
                samples_per_s: float) -> None:
        logged = {f"eval/{k}": v for k, v in values.items()}
        logged["eval/samples_per_s"] = samples_per_s
        # Also for train.py's metrics.json: self.log is not allowed in on_train_end.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        line = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "metrics": values,
                "n": self.num_samples, "n_real": self._n_real, **asdict(self.protocol),
                "features": self._extractor_name, "samples_per_s": samples_per_s,
                "world_size": trainer.world_size, **describe_model(pl_module)}
        path = Path(trainer.default_root_dir) / "metrics" / "eval.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

