"""Image transforms for training batches: resize, crop, flip, and scaling to [-1, 1]."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """PIL image -> float tensor CHW in [-1, 1] at `size` x `size`.

    The shorter side is resized to `size` (bicubic, antialiased), then a square is cropped
    (centre, or random for training) and optionally flipped. Randomness comes from the `rng`
    passed per call, so a stream seeded per rank and worker is reproducible.
    """

    def __init__(self, size: int, crop: str = "center", flip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.size, self.crop, self.flip = size, crop, flip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        if scale != 1:
            image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                 Image.Resampling.BICUBIC)
        w, h = image.size
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255] (rounded, clamped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
