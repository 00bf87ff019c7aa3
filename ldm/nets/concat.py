"""Spatial conditions appended to the noisy latent (the `concat` entry of a condition dict).

Each is called as stage(batch, encode, latent_hw) -> (B, C, h, w), where `encode` maps [-1, 1]
images to scaled latents with the model's frozen first stage. (Semantic maps go through a
trainable encoder instead, ldm.nets.embedders.SpatialRescaler, as the model's cond stage.)
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
    (the paper's inpainting model: 3 + 3 + 1 input channels).

    The batch's `mask` is 1 at known pixels, 0 in the holes, whatever the model; what the model
    sees is set by its training convention:
    hole_value: the holes' pixel value in the masked image it encodes (ours: 0, i.e. image * mask;
        the reference's inpainting_big: -1, black), so any fill of the batch's holes works;
    mask_keep, mask_fill: the mask channel's value at known pixels and in the holes (ours: 1 / 0;
        the reference's: -1 / +1, its scripts/inpaint.py mask "1 = fill" mapped by x * 2 - 1).
    """

    def __init__(self, image_key: str = "masked_image", mask_key: str = "mask", latent_channels: int = 3,
                 hole_value: float = 0.0, mask_keep: float = 1.0, mask_fill: float = 0.0):
        super().__init__()
        self.image_key, self.mask_key = image_key, mask_key
        self.channels = latent_channels + 1
        self.hole_value, self.mask_keep, self.mask_fill = hole_value, mask_keep, mask_fill

    def forward(self, batch: dict, encode: Encode, latent_hw: tuple[int, int]) -> torch.Tensor:
        keep = _batch_tensor(batch, self.mask_key).float()
        image = _batch_tensor(batch, self.image_key)
        if keep.shape[-2:] != image.shape[-2:] or keep.shape[1] != 1:
            raise ValueError(f"the mask must be (B, 1, H, W) at the image's size {tuple(image.shape[-2:])}, "
                             f"got {tuple(keep.shape)}")
        masked = encode(torch.where(keep.bool(), image, torch.full_like(image, self.hole_value)))
        # nearest picks mask pixels, so mapping the values before or after resizing is the same
        keep = F.interpolate(keep, size=latent_hw, mode="nearest")
        channel = keep * self.mask_keep + (1 - keep) * self.mask_fill
        return torch.cat([masked, channel.to(masked.dtype)], dim=1)


def paste_known(known: torch.Tensor, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inpainting results as delivered: the known pixels (mask 1) from `known`, the holes from
    `output` (the reference's scripts/inpaint.py composite, in [-1, 1])."""
    mask = mask.to(output.dtype)
    return mask * known + (1 - mask) * output
