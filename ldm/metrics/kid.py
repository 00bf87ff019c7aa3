"""Kernel Inception Distance (Binkowski et al. 2018), as torch-fidelity computes it.

KID is the unbiased estimate of the squared MMD between real and generated features under the
polynomial kernel k(x, y) = (gamma <x, y> + coef0)^degree, averaged over random subsets.
Subsets are drawn exactly as torch-fidelity draws them (numpy RandomState(seed).choice without
replacement, real subset first), so with the same seed the numbers match torch-fidelity's;
kernels are evaluated in float64.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> Tensor:
    """(gamma x y^T + coef0)^degree; gamma defaults to 1 / feature size."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: Tensor, k_xy: Tensor, k_yy: Tensor) -> Tensor:
    """MMD^2 estimate of torch-fidelity's 'unbiased' mode: the within-set sums drop their
    diagonals (divided by m (m - 1)), the cross sum keeps all m^2 terms."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(
    real: Tensor,
    fake: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 2020,
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of `subset_size`
    real and fake (N, D) features (population std, as torch-fidelity)."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need real and fake features (N, D) of one D, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if min(len(real), len(fake)) < subset_size:
        raise ValueError(f"KID subset_size {subset_size} is larger than the {len(real)} real / {len(fake)} "
                         "generated samples: lower subset_size or evaluate more samples")
    real = real.to(torch.float64)
    fake = fake.to(device=real.device, dtype=torch.float64)
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = real[torch.from_numpy(rng.choice(len(real), subset_size, replace=False)).to(real.device)]
        y = fake[torch.from_numpy(rng.choice(len(fake), subset_size, replace=False)).to(real.device)]
        mmds.append(mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef0),
                                  polynomial_kernel(x, y, degree, gamma, coef0),
                                  polynomial_kernel(y, y, degree, gamma, coef0)))
    values = torch.stack(mmds)
    return float(values.mean()), float(values.std(correction=0))
