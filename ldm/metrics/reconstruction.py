"""Reconstruction metrics for autoencoders and inpainting: PSNR and SSIM per image.

Images are batches (N, C, H, W) in [-1, 1], clamped to that range and mapped to [0, 1] (the range
the saved images have); every function returns one float64 value per image, (N,), and the reported
number is the mean over images (not the PSNR of the pooled MSE). LPIPS lives in ldm.metrics.lpips.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def _unit_range(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"need two image batches (N, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    # float64: SSIM's variances of near-flat regions lose digits in float32.
    return (x.double().clamp(-1, 1) + 1) / 2, (y.double().clamp(-1, 1) + 1) / 2


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB, 10 log10(1 / MSE) on [0, 1] images; inf where the images are equal."""
    a, b = _unit_range(x, y)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03)
    on [0, 1] images, from torchmetrics' functional SSIM."""
    a, b = _unit_range(x, y)
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
