"""A bootstrap interval for FID: how much of a difference between two FIDs is sampling noise.

FID on a few hundred samples moves by whole points from one draw of samples to the next, so a
table that ranks models needs an interval. The generated set is resampled with replacement
(`resamples` times, a seeded generator) and FID recomputed against the real side; the real side
is resampled as well when its features are given (else its statistics stay fixed, as when they
come from a cache: models scored against the same real set share that part of the noise, so the
fixed-real interval is the one that says whether two models differ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.metrics.fid import feature_statistics, frechet_distance


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval of a statistic, with the spread of its resamples."""

    low: float
    high: float
    std: float
    resamples: int
    level: float


def _resample(features: Tensor, gen: torch.Generator) -> Tensor:
    return features[torch.randint(len(features), (len(features),), generator=gen)]


def bootstrap_fid(fake: Tensor, real_mu: Tensor, real_sigma: Tensor, real: Tensor | None = None,
                  resamples: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval (`level`) of FID over `resamples` bootstrap draws of the (N, D) `fake`
    features, against the real statistics (`real_mu`, `real_sigma`), or against resamples of the
    (M, D) `real` features when given. Float64 throughout, on the features' device."""
    if resamples < 2:
        raise ValueError(f"a bootstrap needs at least 2 resamples, got {resamples} (200 is usual)")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage in (0, 1), e.g. 0.95; got {level}")
    if fake.ndim != 2 or len(fake) < 2:
        raise ValueError(f"fake features must be (N, D) with N >= 2, got shape {tuple(fake.shape)}")
    gen = torch.Generator().manual_seed(seed)
    fake, values = fake.double().cpu(), []
    real = None if real is None else real.double().cpu()
    for _ in range(resamples):
        mu_f, sigma_f = feature_statistics(_resample(fake, gen))
        mu_r, sigma_r = (real_mu, real_sigma) if real is None else feature_statistics(_resample(real, gen))
        values.append(frechet_distance(mu_r, sigma_r, mu_f, sigma_f))
    v = torch.tensor(values, dtype=torch.float64)
    tail = (1 - level) / 2
    low, high = torch.quantile(v, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(low=low, high=high, std=float(v.std()), resamples=resamples, level=level)
