"""Image transforms for training batches: decoding, resize, crop, flip, and scaling to [-1, 1]."""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image


# PIL modes of one-channel images whose values are the ids themselves (P: palette indices).
ID_MODES = ("L", "P", "I", "I;16", "1")


class MapSizeError(ValueError):
    """A label map or mask whose size is not its image's: the shards are wrong, not one sample."""


def read_ids(data: bytes, what: str) -> np.ndarray:
    """The (H, W) int64 ids of a one-channel image file's bytes (a label map, a mask); `what`
    names it in errors."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ID_MODES:
            raise ValueError(f"{what} is a {img.mode} image; label maps and masks are one channel of ids "
                             f"(PNG mode {', '.join(ID_MODES)}), not colours: convert it to ids first")
        return np.array(img).astype(np.int64)


class ImageTransform:
    """PIL image or encoded image bytes -> float tensor CHW in [-1, 1] at `size` x `size`.

    The shorter side is resized to `size` (bicubic, antialiased), then a square is cropped
    (centre, or random for training) and optionally flipped. Randomness comes from the `rng`
    passed per call, so a stream seeded per rank and worker is reproducible.

    `decode_aligned` also takes per-pixel maps of the image (label maps, masks: integer ids at the
    image's size) and gives them the same geometry: resized with nearest-neighbour (ids are never
    blended), the same crop box and the same flip draw.
    """

    def __init__(self, size: int, crop: str = "center", flip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.size, self.crop, self.flip = size, crop, flip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_float(self._place(_rgb_pixels(image), {}, rng)[0])

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
        return self.decode_aligned(data, {}, rng)[0]

    def decode_aligned(self, data: bytes, maps: dict[str, np.ndarray], rng: random.Random | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """decode(data), and each (H, W) integer map of `maps` (at the image's size, else
        MapSizeError) as an int64 (size, size) tensor with the image's resize, crop and flip."""
        pixels = _decode_pixels(data)
        h, w = pixels.shape[1:]
        for name, ids in maps.items():
            if tuple(ids.shape) != (h, w):
                raise MapSizeError(f"{name} is {ids.shape[1]}x{ids.shape[0]} px but its image {w}x{h} px: a label "
                                   "map or mask must have its image's size (rewrite the shards with python -m "
                                   "ldm.data.write, which checks this)")
        image, placed = self._place(pixels, maps, rng)
        return to_float(image), placed

    def _place(self, pixels: torch.Tensor, maps: dict[str, np.ndarray], rng: random.Random | None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Resize uint8 CHW pixels (bicubic) and their maps (nearest) to the shorter side `size`,
        then crop and flip them alike."""
        h, w = pixels.shape[1:]
        scale = self.size / min(w, h)
        out = {name: torch.from_numpy(np.asarray(ids, dtype=np.int64)) for name, ids in maps.items()}
        if scale != 1:  # resize with PIL, as the reference pipeline does
            shape = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
            image = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize(shape, Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
            out = {name: torch.from_numpy(np.array(Image.fromarray(ids.numpy().astype(np.int32)).resize(
                shape, Image.Resampling.NEAREST), dtype=np.int64)) for name, ids in out.items()}
        h, w = pixels.shape[1:]
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        flip = self.flip and rng is not None and rng.random() < 0.5
        window = (slice(top, top + self.size), slice(left, left + self.size))
        pixels = pixels[(slice(None), *window)]
        out = {name: ids[window] for name, ids in out.items()}
        if flip:
            pixels, out = pixels.flip(2), {name: ids.flip(1) for name, ids in out.items()}
        return pixels, out


def _rgb_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 CHW of a PIL image in RGB."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def _decode_pixels(data: bytes) -> torch.Tensor:
    """uint8 RGB CHW of encoded image bytes: torchvision, or PIL for what it does not read."""
    try:
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision lacks, or damaged bytes: PIL reads or rejects it
        pixels = None
    if pixels is None or pixels.dtype != torch.uint8:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _rgb_pixels(img)
    return pixels


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images -> contiguous float32 in [-1, 1] (x / 127.5 - 1), in one pass over a new tensor."""
    out = torch.empty(pixels.shape, dtype=torch.float32)
    return out.copy_(pixels).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255] (rounded, clamped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
