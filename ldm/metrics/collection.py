"""Generative metrics as torchmetrics Metrics, for the evaluation callback and evaluate.py.

torchmetrics' FID / KID / IS classes are used for their states, updates and DDP synchronisation,
with our feature extractor as their `feature` module (so Inception inputs are resized as
torch-fidelity does, not with torchmetrics' antialiased default). Their `compute` is replaced by
this package's pure functions, so a Metric and the function on the same features give the same
number: FID via ldm.metrics.fid.frechet_distance, KID and IS with torch-fidelity's seeded subset
and split rules (torchmetrics' own draw unseeded subsets and split differently).

All metrics share one calling convention, `update(images, real: bool)`, so one MetricCollection
takes every batch; IS ignores real batches. The text-alignment metrics (CAPTION_METRICS:
prompt_accuracy, clip_score) score generated images against the captions they were generated
from and also take `captions=`: `collection.update(images, real=False, captions=[...])`
(MetricCollection hands each metric only the keyword arguments its update names, so the others
never see them). Results are flat scalar tensors: fid, kid_mean, kid_std, is_mean, is_std,
precision, recall, prompt_accuracy, shape_accuracy, color_accuracy, prompt_accuracy_chance,
clip_score.

Each metric runs its extractor itself: with FID, KID and precision/recall on Inception features
and IS on its logits, a generated batch passes through Inception four times (small next to
sampling the images). `batch_rows` runs each network once and returns its per-image outputs
(ldm.metrics.rows); `update_from_rows` adds such rows, computed elsewhere or earlier, with the
numbers `update` on the images would give (evaluate.py stores them per chunk of samples).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat

from ldm.metrics.captioned import CaptionedMetric
from ldm.metrics.clip_score import ClipScore
from ldm.metrics.features import FeatureExtractor
from ldm.metrics.fid import FeatureStatistics, check_same_extractor, frechet_distance
from ldm.metrics.inception_score import inception_score
from ldm.metrics.kid import kernel_inception_distance
from ldm.metrics.precision_recall import PrecisionRecall, stored_rows
from ldm.metrics.prompt_accuracy import PromptAccuracy
from ldm.metrics.rows import Rows, rows_or_run
from ldm.metrics.shape_classifier import load_classifier

FEATURE_METRICS = ("fid", "kid", "is", "precision_recall")  # on the feature network
CAPTION_METRICS = ("prompt_accuracy", "clip_score")  # generated images against their captions
METRIC_NAMES = (*FEATURE_METRICS, *CAPTION_METRICS)
NO_REAL_SIDE = ("is", *CAPTION_METRICS)  # need no real images


def _require_extractor(extractor: Any, role: str) -> FeatureExtractor:
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"{role} must be an ldm.metrics.features.FeatureExtractor (it names its features for "
                        f"cached statistics), got {type(extractor).__name__}")
    return extractor


class _ExtractorRows:
    """The rows (ldm.metrics.rows) of torchmetrics' image metrics: what their feature module
    (`inception`, our extractor) makes of each image."""

    inception: FeatureExtractor

    @property
    def row_network(self) -> FeatureExtractor:
        """The network that makes this metric's rows."""
        return self.inception

    def rows(self, images: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """The extractor's outputs (features, or IS's logits) for `images`, one row per image."""
        return self.inception(images)


class FID(_ExtractorRows, FrechetInceptionDistance):
    """torchmetrics' FID (float64 running sums of features and outer products) with our
    extractor and our Frechet distance; can export and import the real statistics."""

    row_key, takes_real = "features", True

    def __init__(self, extractor: FeatureExtractor, reset_real_features: bool = True, **kwargs: Any):
        super().__init__(feature=_require_extractor(extractor, "extractor"), reset_real_features=reset_real_features,
                         **kwargs)

    def update(self, imgs: Tensor | Rows, real: bool) -> None:  # type: ignore[override]
        """Add a batch of images, or their precomputed rows, to the running sums (torchmetrics'
        update, with the extraction skipped for rows)."""
        features = rows_or_run(imgs, self.inception).double()
        if features.dim() == 1:
            features = features.unsqueeze(0)
        if real:
            self.real_features_sum += features.sum(dim=0)
            self.real_features_cov_sum += features.t().mm(features)
            self.real_features_num_samples += features.shape[0]
        else:
            self.fake_features_sum += features.sum(dim=0)
            self.fake_features_cov_sum += features.t().mm(features)
            self.fake_features_num_samples += features.shape[0]

    def statistics(self, real: bool) -> tuple[Tensor, Tensor, int]:
        prefix = "real" if real else "fake"
        n = int(getattr(self, f"{prefix}_features_num_samples"))
        if n < 2:
            raise RuntimeError(f"FID needs at least 2 {prefix} samples, got {n}")
        total = getattr(self, f"{prefix}_features_sum")
        mu = total / n
        sigma = (getattr(self, f"{prefix}_features_cov_sum") - n * torch.outer(mu, mu)) / (n - 1)
        return mu, sigma, n

    def compute(self) -> Tensor:
        """FID between the real and generated images seen so far (all ranks)."""
        mu_r, sigma_r, _ = self.statistics(real=True)
        mu_f, sigma_f, _ = self.statistics(real=False)
        return torch.tensor(frechet_distance(mu_r, sigma_r, mu_f, sigma_f), dtype=torch.float64)

    def real_statistics(self) -> FeatureStatistics:
        """The real images' statistics over all ranks, tagged with the extractor, for caching."""
        with self.sync_context():
            mu, sigma, n = self.statistics(real=True)
        return FeatureStatistics(mu.cpu().numpy(), sigma.cpu().numpy(), n, self.inception.name,
                                 self.inception.settings)

    def load_real_statistics(self, stats: FeatureStatistics) -> None:
        """Use cached reference statistics as the real side (refused if another extractor made
        them). Under DDP only rank 0 holds them, as the states are summed over ranks. With
        reset_real_features=True the next reset() clears them again."""
        check_same_extractor(stats.extractor, stats.settings, self.inception.name, self.inception.settings)
        if stats.mu.shape != self.real_features_sum.shape:
            raise ValueError(f"statistics have {stats.mu.shape[0]} features, the extractor "
                             f"{self.inception.num_features}")
        mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=self.device)
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=self.device)
        owner = not (dist.is_available() and dist.is_initialized()) or dist.get_rank(self.process_group) == 0
        n = stats.n if owner else 0
        self.real_features_sum = n * mu
        self.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu) if owner else torch.zeros_like(sigma)
        self.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=self.device)


class KID(_ExtractorRows, KernelInceptionDistance):
    """torchmetrics' KID states with ldm.metrics.kid.kernel_inception_distance as compute."""

    def __init__(self, extractor: FeatureExtractor, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                 gamma: float | None = None, coef0: float = 1.0, seed: int = 2020, reset_real_features: bool = True,
                 **kwargs: Any):
        super().__init__(feature=_require_extractor(extractor, "extractor"), subsets=subsets, subset_size=subset_size,
                         degree=degree, gamma=None if gamma is None else float(gamma), coef=float(coef0),
                         reset_real_features=reset_real_features, **kwargs)
        self.seed = seed
        # torchmetrics gathers these list states batch by batch, which hangs when ranks saw
        # different numbers of batches; 'cat' concatenates per rank first.
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    row_key, takes_real = "features", True

    def update(self, imgs: Tensor | Rows, real: bool) -> None:  # type: ignore[override]
        """Store the features of a batch of images, or their precomputed rows."""
        features = rows_or_run(imgs, self.inception)
        (self.real_features if real else self.fake_features).append(features)

    def compute(self) -> dict[str, Tensor]:
        """{'kid_mean', 'kid_std'} over all ranks' features."""
        if not stored_rows(self.real_features) or not stored_rows(self.fake_features):
            raise RuntimeError("KID needs real and generated samples; update() saw none of one kind")
        mean, std = kernel_inception_distance(dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features),
                                              self.subsets, self.subset_size, self.degree, self.gamma, self.coef,
                                              self.seed)
        return {"kid_mean": torch.tensor(mean, dtype=torch.float64), "kid_std": torch.tensor(std, dtype=torch.float64)}


class IS(_ExtractorRows, InceptionScore):
    """torchmetrics' IS states over generated images only, with
    ldm.metrics.inception_score.inception_score as compute. `logits_extractor` must return
    class logits (InceptionV3Features(output='logits') for the standard IS)."""

    def __init__(self, logits_extractor: FeatureExtractor, splits: int = 10, seed: int = 2020, **kwargs: Any):
        super().__init__(feature=_require_extractor(logits_extractor, "logits_extractor"), splits=splits, **kwargs)
        self.seed = seed
        self.add_state("features", [], dist_reduce_fx="cat")  # see KID

    row_key, takes_real = "logits", False

    def update(self, imgs: Tensor | Rows, real: bool) -> None:  # type: ignore[override]
        """Store the logits of generated batches (or their precomputed rows); real batches do not
        enter the IS."""
        if not real:
            self.features.append(rows_or_run(imgs, self.inception))

    def compute(self) -> dict[str, Tensor]:
        """{'is_mean', 'is_std'} over all ranks' generated samples."""
        if not stored_rows(self.features):
            raise RuntimeError("IS needs generated samples; update(..., real=False) was never called")
        mean, std = inception_score(dim_zero_cat(self.features), self.splits, self.seed)
        return {"is_mean": torch.tensor(mean, dtype=torch.float64), "is_std": torch.tensor(std, dtype=torch.float64)}


def build_metrics(
    names: Sequence[str],
    extractor: FeatureExtractor | None,
    logits_extractor: FeatureExtractor | None = None,
    *,
    reset_real_features: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    pr_block_size: int = 10000,
    seed: int = 2020,
    classifier: str | Path | None = None,
    clip_model: str | Path | None = None,
) -> MetricCollection:
    """A MetricCollection of the metrics in `names` (from METRIC_NAMES) that all take
    `update(images, real)` (and `captions=`, see the module doc); FID, KID and precision/recall
    use `extractor` (None when none of them is asked for), IS uses `logits_extractor`,
    prompt_accuracy the shape classifier in folder `classifier`
    (ldm.cli.train_classifier), clip_score the CLIP model `clip_model` (folder or hub name).
    reset_real_features=False keeps the real side across reset() (a fixed reference set evaluated
    once). Defaults are the standard protocols (REFERENCE.md section 9)."""
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown or not names:
        raise ValueError(f"unknown or no metric names {unknown or list(names)}; choose from {METRIC_NAMES}")
    if set(names) & {"fid", "kid", "precision_recall"}:
        _require_extractor(extractor, "extractor")
    metrics: dict[str, Any] = {}
    if "fid" in names:
        metrics["fid"] = FID(extractor, reset_real_features=reset_real_features)
    if "kid" in names:
        metrics["kid"] = KID(extractor, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed,
                             reset_real_features=reset_real_features)
    if "is" in names:
        if logits_extractor is None:
            raise ValueError("IS needs logits_extractor (e.g. InceptionV3Features(output='logits'))")
        metrics["is"] = IS(logits_extractor, splits=is_splits, seed=seed)
    if "precision_recall" in names:
        metrics["precision_recall"] = PrecisionRecall(extractor, k=pr_k, block_size=pr_block_size,
                                                      reset_real_features=reset_real_features)
    if "prompt_accuracy" in names:
        if not classifier:
            raise ValueError("prompt_accuracy needs classifier=<folder> (train one with `python -m "
                             "ldm.cli.train_classifier --resolution <px> --out <folder>`)")
        metrics["prompt_accuracy"] = PromptAccuracy(load_classifier(classifier))
    if "clip_score" in names:
        if not clip_model:
            raise ValueError("clip_score needs clip_model=<folder with a CLIP model and processor, or a hub name>")
        metrics["clip_score"] = ClipScore(str(clip_model))
    # Each metric keeps its own states: merging look-alike states (compute groups) would make
    # correctness depend on which metrics happen to be configured together.
    return MetricCollection(metrics, compute_groups=False)


@torch.no_grad()  # as torchmetrics runs update()
def batch_rows(metrics: MetricCollection, images: Tensor, real: bool,
               captions: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The per-image rows (ldm.metrics.rows) the metrics take from a batch of images, by row key
    ('features' for FID, KID and precision/recall, which share the extractor; 'logits' for IS;
    one per caption metric), each network run once. A real batch: only the metrics with a real side."""
    rows: dict[str, Tensor] = {}
    networks: dict[str, Any] = {}
    for metric in metrics.values():
        if real and not metric.takes_real:
            continue
        key = metric.row_key
        if key not in rows:
            rows[key], networks[key] = metric.rows(images, captions), metric.row_network
        elif metric.row_network is not networks[key]:
            raise ValueError(f"metrics sharing the rows {key!r} must use one extractor (build_metrics does)")
    return rows


def update_from_rows(metrics: MetricCollection, rows: Mapping[str, Tensor], real: bool,
                     captions: Sequence[str] | None = None) -> None:
    """Add rows made by `batch_rows` (on any device, e.g. read back from a file) to the metrics, as
    `metrics.update(images, real, captions=...)` would add the images themselves."""
    for metric in metrics.values():
        if real and not metric.takes_real:
            continue
        extra = {"captions": captions} if isinstance(metric, CaptionedMetric) else {}
        metric.update(Rows(rows[metric.row_key].to(metric.device)), real, **extra)
