"""Frechet distance between feature distributions, and cached reference statistics.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64 with the N-1
covariance (as torch-fidelity and torchmetrics). The trace of the matrix square root is taken
from eigenvalues (torch.linalg.eigh), not scipy.linalg.sqrtm: tr((S1 S2)^(1/2)) equals the sum of
square roots of the eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which is stable,
needs no complex arithmetic and runs on the GPU. It agrees with the sqrtm route of pytorch-fid /
torch-fidelity to about 1e-8 relative on well-conditioned covariances.

Reference statistics are cached in .npz files (mu, sigma, n, extractor name, settings) and only
compared with statistics from the same extractor and settings.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


class ExtractorMismatchError(ValueError):
    """Two sets of statistics or features come from different feature extractors."""


def _float64(x: ArrayLike, device: torch.device | None = None) -> Tensor:
    t = torch.as_tensor(x)
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def feature_statistics(features: ArrayLike) -> tuple[Tensor, Tensor]:
    """Mean (D,) and N-1 covariance (D, D) of (N, D) features, in float64."""
    f = _float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features (N, D) with N >= 2 for a covariance, got shape {tuple(f.shape)}")
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64 on
    the device of `mu1` (eigenvalue route, see the module docstring)."""
    mu1 = _float64(mu1)
    device = mu1.device
    mu2, s1, s2 = _float64(mu2, device), _float64(sigma1, device), _float64(sigma2, device)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not fit: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or inf; check the features (e.g. a diverged model's samples)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    # Negative eigenvalues are rounding noise of a PSD matrix: clamp before the square root.
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def _normalised_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    # JSON round trip: what is compared is exactly what a cache file can hold.
    return json.loads(json.dumps(dict(settings), sort_keys=True))


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of n features from extractor `extractor` with `settings`."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", np.asarray(self.mu, dtype=np.float64))
        object.__setattr__(self, "sigma", np.asarray(self.sigma, dtype=np.float64))
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "settings", _normalised_settings(self.settings))
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 0 or self.sigma.shape != (d, d):
            raise ValueError(f"mu must be (D,) and sigma (D, D); got {self.mu.shape} and {self.sigma.shape}")

    @classmethod
    def from_features(cls, features: ArrayLike, extractor: str, settings: Mapping[str, Any]) -> FeatureStatistics:
        """Statistics of (N, D) features produced by `extractor` with `settings`."""
        mu, sigma = feature_statistics(features)
        return cls(mu.cpu().numpy(), sigma.cpu().numpy(), len(features), extractor, dict(settings))


def check_same_extractor(name_a: str, settings_a: Mapping[str, Any],
                         name_b: str, settings_b: Mapping[str, Any]) -> None:
    """Raise ExtractorMismatchError unless the two extractor names and settings are equal."""
    settings_a, settings_b = _normalised_settings(settings_a), _normalised_settings(settings_b)
    if name_a == name_b and settings_a == settings_b:
        return
    keys = sorted(k for k in set(settings_a) | set(settings_b) if settings_a.get(k) != settings_b.get(k))
    detail = (f"; settings differ in {keys}: {[settings_a.get(k) for k in keys]} vs "
              f"{[settings_b.get(k) for k in keys]}") if keys else ""
    raise ExtractorMismatchError(f"features come from different extractors: {name_a!r} vs {name_b!r}{detail}. "
                                 "Recompute the reference statistics with the extractor used for the samples.")


def check_compatible(a: FeatureStatistics, b: FeatureStatistics) -> None:
    """Raise ExtractorMismatchError unless `a` and `b` come from the same extractor and settings."""
    check_same_extractor(a.extractor, a.settings, b.extractor, b.settings)
    if a.mu.shape != b.mu.shape:
        raise ExtractorMismatchError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two sets of statistics, refusing statistics of different extractors."""
    check_compatible(a, b)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def save_statistics(path: str | Path, stats: FeatureStatistics) -> None:
    """Write `stats` to the .npz file `path` (written to a temporary file, then renamed, so
    a crash never leaves a truncated cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(stats.extractor),
                 settings=np.str_(json.dumps(stats.settings, sort_keys=True)))
    os.replace(tmp, path)


def load_statistics(path: str | Path) -> FeatureStatistics:
    """Read statistics written by `save_statistics`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = sorted({"mu", "sigma", "n", "extractor", "settings"} - set(data.files))
        if missing:
            raise ValueError(f"{path} lacks {missing}: it was not written by ldm.metrics.fid.save_statistics "
                             "(files without the extractor's name cannot be checked; recompute the statistics)")
        return FeatureStatistics(data["mu"], data["sigma"], int(data["n"]), str(data["extractor"]),
                                 json.loads(str(data["settings"])))
