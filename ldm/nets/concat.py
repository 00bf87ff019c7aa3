"""Spatial conditions appended to the noisy latent (the `concat` entry of a condition dict).

Each is called as stage(batch, encode, latent_hw) -> (B, C, h, w), where `encode` maps [-1, 1]
images to scaled latents with the model's frozen first stage.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Encode = Callable[[torch.Tensor], torch.Tensor]


def _batch_tensor(batch: dict, key: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"the concat condition needs batch[{key!r}]; add the matching degradation to the data "
                       f"pipeline or pass {key} to the sampler")
    return batch[key]


class LowResConcat(nn.Module):
    """Super-resolution: the low-resolution image, resized to the latent grid (bicubic).
    The paper's SR model concatenates the 64 px input to 64 x 64 f=4 latents (3 + 3 channels)."""

    channels = 3

    def __init__(self, key: str = "lowres"):
        super().__init__()
        self.key = key

    def forward(self, batch: dict, encode: Encode, latent_hw: tuple[int, int]) -> torch.Tensor:
        low = _batch_tensor(batch, self.key)
        if tuple(low.shape[-2:]) != tuple(latent_hw):
            low = F.interpolate(low, size=latent_hw, mode="bicubic", align_corners=False)
        return low


class InpaintConcat(nn.Module):
    """Inpainting: the first-stage latent of the masked image and the mask at latent size
    (the paper's inpainting model: 3 + 3 + 1 input channels). mask: 1 = known pixel."""

    def __init__(self, image_key: str = "masked_image", mask_key: str = "mask", latent_channels: int = 3):
        super().__init__()
        self.image_key, self.mask_key = image_key, mask_key
        self.channels = latent_channels + 1

    def forward(self, batch: dict, encode: Encode, latent_hw: tuple[int, int]) -> torch.Tensor:
        masked = encode(_batch_tensor(batch, self.image_key))
        mask = F.interpolate(_batch_tensor(batch, self.mask_key).float(), size=latent_hw, mode="nearest")
        return torch.cat([masked, mask.to(masked.dtype)], dim=1)


class SemanticConcat(nn.Module):
    """Semantic synthesis: a label map (B, H, W) of `n_classes` ids, one-hot and resized to the
    latent grid (nearest), as the paper's rescaled 182-class maps."""

    def __init__(self, n_classes: int, key: str = "segmentation"):
        super().__init__()
        self.n_classes, self.key = n_classes, key
        self.channels = n_classes

    def forward(self, batch: dict, encode: Encode, latent_hw: tuple[int, int]) -> torch.Tensor:
        seg = _batch_tensor(batch, self.key).long()
        if int(seg.max()) >= self.n_classes or int(seg.min()) < 0:
            raise ValueError(f"segmentation ids must lie in [0, {self.n_classes}), got {int(seg.min())}..{int(seg.max())}")
        onehot = F.one_hot(seg, self.n_classes).permute(0, 3, 1, 2).float()
        return F.interpolate(onehot, size=latent_hw, mode="nearest")
