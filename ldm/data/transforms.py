"""Image transforms for training batches: decoding, resize, crop, flip, and scaling to [-1, 1]."""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image


class ImageTransform:
    """PIL image or encoded image bytes -> float tensor CHW in [-1, 1] at `size` x `size`.

    The shorter side is resized to `size` (bicubic, antialiased), then a square is cropped
    (centre, or random for training) and optionally flipped. Randomness comes from the `rng`
    passed per call, so a stream seeded per rank and worker is reproducible.
    """

    def __init__(self, size: int, crop: str = "center", flip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.size, self.crop, self.flip = size, crop, flip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_float(self._pil_pixels(image, rng))

    def decode(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """Encoded image bytes (PNG, JPEG, ...) -> float CHW in [-1, 1], equal to decoding with PIL
        and calling the transform.

        torchvision decodes straight into a tensor, about 2.5x faster than PIL's PNG decoder and
        without PIL's image copies; the pixels are the same (PNG is lossless, and both decode JPEG
        with libjpeg-turbo's defaults: tests/test_transforms.py). Images already at `size` on their
        shorter side (shards written at the training resolution, the common case) never become PIL
        images; others are resized by PIL's bicubic, as in the reference pipeline. Formats
        torchvision does not read (and 16-bit PNGs) are decoded by PIL.
        """
        try:
            pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # a format torchvision lacks, or damaged bytes: PIL reads or rejects it
            pixels = None
        if pixels is None or pixels.dtype != torch.uint8:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return self(img, rng)
        if min(pixels.shape[1:]) != self.size:  # resize with PIL, as the reference pipeline does
            return self(Image.fromarray(pixels.permute(1, 2, 0).numpy()), rng)
        return to_float(self._crop_flip(pixels, rng))

    def _pil_pixels(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The transformed PIL image as uint8 CHW (before scaling to [-1, 1])."""
        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        if scale != 1:
            image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                 Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return self._crop_flip(pixels, rng)

    def _crop_flip(self, pixels: torch.Tensor, rng: random.Random | None) -> torch.Tensor:
        """Square crop and optional flip of uint8 CHW pixels whose shorter side is `size`."""
        h, w = pixels.shape[1:]
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        pixels = pixels[:, top:top + self.size, left:left + self.size]
        if self.flip and rng is not None and rng.random() < 0.5:
            pixels = pixels.flip(2)
        return pixels


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images -> contiguous float32 in [-1, 1] (x / 127.5 - 1), in one pass over a new tensor."""
    out = torch.empty(pixels.shape, dtype=torch.float32)
    return out.copy_(pixels).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255] (rounded, clamped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
