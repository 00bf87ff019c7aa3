"""The evaluation protocol of latent diffusion models, shared by the training callback
(ldm.callbacks.evaluation) and evaluate.py (ldm.cli.evaluate).

Samples are generated with one sampler setting (`SamplingProtocol`) under the conditions of real
validation batches (captions, class labels, low-res or masked inputs: whatever the model is
conditioned on), so text and class models are scored on the data's own conditions; sample i uses
seed `seed + i`; the real side is the validation images. Metrics come from
ldm.metrics.collection (one `update(images, real)` for all of them; text models' samples also
carry the captions they were generated from, for prompt accuracy and CLIP score).
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class, instantiate

from ldm.data.pipeline import BOOKKEEPING_KEYS
from ldm.metrics.collection import CAPTION_METRICS, FEATURE_METRICS
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
        # The model's own guidance rule (it reads only model.model.conditioning_key).
        LatentDiffusion.check_guidance(model, self.guidance)
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
