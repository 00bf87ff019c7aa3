"""Degradations that make the conditioning inputs of super-resolution and inpainting.

Both work on batch dicts whose `image` is a float tensor in [-1, 1], NCHW, and return a new dict
with the added entries (the input dict is left as it was):
- SRDegradation adds `lowres` (B, 3, H/f, W/f): antialiased bicubic downsampling.
- InpaintingDegradation adds `mask` (B, 1, H, W) and `masked_image` = image * mask.

Mask convention, everywhere in this module: 1 = known pixel that is kept, 0 = hole to inpaint.
It is the convention of masked sampling (REFERENCE.md section 3):
x = q_sample(x0, t) * mask + (1 - mask) * x keeps the known region where mask is 1.
"Coverage" is the hole fraction, the share of pixels where mask is 0.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W) in [-1, 1], got {got}")


def bicubic_downsample(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Downsample (B, C, H, W) images in [-1, 1] by an integer `factor` with antialiased bicubic
    filtering (torch.nn.functional.interpolate(antialias=True), which equals PIL's BICUBIC resize
    on float images to ~1e-7), clamped to [-1, 1] as an 8-bit PIL image would be.
    Computed in float32 and returned in the input dtype."""
    _check_images(images)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}; "
                         "crop or resize the images to a multiple of it")
    small = F.interpolate(images.float(), size=(h // factor, w // factor), mode="bicubic",
                          antialias=True, align_corners=False)
    return small.clamp(-1, 1).to(images.dtype)


def _batch_images(batch: dict) -> torch.Tensor:
    if "image" not in batch:
        raise KeyError(f"the batch has no 'image' entry (keys: {sorted(batch)})")
    _check_images(batch["image"])
    return batch["image"]


@dataclass(frozen=True)
class SRDegradation:
    """Adds `lowres` = bicubic_downsample(image, factor) to a batch (deterministic)."""

    factor: int = 4

    def __call__(self, batch: dict) -> dict:
        return {**batch, "lowres": bicubic_downsample(_batch_images(batch), self.factor)}


def hole_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Coverage of (..., 1, H, W) masks (1 = keep, 0 = hole): the share of hole pixels, shape (...).

    float64, so a binary mask's coverage is exactly holes / pixels and bucket edges are exact."""
    return (1 - mask.double()).flatten(-3).mean(-1)


def in_coverage_bucket(mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Whether each (..., 1, H, W) mask's hole fraction lies in [low, high), e.g. the LaMa
    evaluation bucket 40-50%: in_coverage_bucket(masks, 0.4, 0.5). Bool tensor of shape (...)."""
    return _in_bucket(hole_fraction(mask), low, high)


def _in_bucket(coverage, low: float, high: float):
    """The one bucket convention (half-open), for tensors and numpy scalars alike."""
    return (coverage >= low) & (coverage < high)


MASK_KINDS: tuple[str, ...] = ("thick", "thin", "box", "mixed")
_MAX_ATTEMPTS = 1000  # draws per mask before a coverage bucket is declared out of reach


@dataclass(frozen=True)
class _StrokeStyle:
    """Random brush strokes; lengths are shares of the shorter image side, ranges inclusive."""

    count: tuple[int, int]  # strokes per mask
    segments: tuple[int, int]  # straight segments per stroke
    width: tuple[float, float]  # brush width
    length: tuple[float, float]  # segment length
    max_turn: float = 2.0  # radians a stroke may turn between segments


_STROKES = {
    "thick": _StrokeStyle(count=(1, 5), segments=(1, 5), width=(0.04, 0.25), length=(0.05, 0.5)),
    "thin": _StrokeStyle(count=(4, 16), segments=(2, 8), width=(0.01, 0.04), length=(0.05, 0.25)),
}
_BOX_COUNT = (1, 4)  # boxes per mask
_BOX_SIDE = (0.1, 0.5)  # box side, share of the image side along that axis
_BOX_MARGIN = 0.04  # boxes keep this share of the image side away from the border


def _draw_strokes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, style: _StrokeStyle, w: int, h: int) -> None:
    side = min(w, h)
    for _ in range(int(rng.integers(style.count[0], style.count[1] + 1))):
        width = max(1, round(rng.uniform(*style.width) * side))
        x, y = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
        angle = rng.uniform(0, 2 * math.pi)
        n = int(rng.integers(style.segments[0], style.segments[1] + 1))
        turns = rng.uniform(-style.max_turn, style.max_turn, n).tolist()
        lengths = (rng.uniform(*style.length, n) * side).tolist()
        points = [(x, y)]
        for turn, length in zip(turns, lengths):  # a random walk kept inside the image
            angle += turn
            x = min(max(x + length * math.cos(angle), 0.0), w - 1.0)
            y = min(max(y + length * math.sin(angle), 0.0), h - 1.0)
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        r = width / 2  # round caps at both ends
        for px, py in (points[0], points[-1]):
            draw.ellipse([px - r, py - r, px + r, py + r], fill=255)


def _draw_boxes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> None:
    for _ in range(int(rng.integers(_BOX_COUNT[0], _BOX_COUNT[1] + 1))):
        bw, bh = rng.uniform(*_BOX_SIDE) * w, rng.uniform(*_BOX_SIDE) * h
        x0 = rng.uniform(_BOX_MARGIN * w, w - _BOX_MARGIN * w - bw)
        y0 = rng.uniform(_BOX_MARGIN * h, h - _BOX_MARGIN * h - bh)
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=255)


class MaskGenerator:
    """LaMa-style random inpainting masks, a pure function of (seed, index, size).

    Kinds: 'thick' (few wide brush strokes), 'thin' (many narrow strokes), 'box' (1-4
    axis-aligned rectangles) and 'mixed' (each mask one of the three, chosen at random).
    A mask is redrawn (from the same random stream) until its hole fraction lies in
    [min_coverage, max_coverage), which samples the kind's masks conditioned on that coverage
    bucket - what filtering generated masks into buckets (LaMa's evaluation) gives.

    Returns float32 masks (1, H, W): 1 = known pixel to keep, 0 = hole to inpaint.
    """

    def __init__(self, kind: str = "mixed", min_coverage: float = 0.0, max_coverage: float = 1.0, seed: int = 0):
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
        if not 0.0 <= min_coverage < max_coverage <= 1.0:
            raise ValueError(f"need 0 <= min_coverage < max_coverage <= 1, got [{min_coverage}, {max_coverage})")
        self.kind, self.min_coverage, self.max_coverage, self.seed = kind, min_coverage, max_coverage, seed

    def _holes(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        kind = self.kind if self.kind != "mixed" else ("thick", "thin", "box")[int(rng.integers(3))]
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        if kind == "box":
            _draw_boxes(draw, rng, width, height)
        else:
            _draw_strokes(draw, rng, _STROKES[kind], width, height)
        return np.asarray(canvas) > 0

    def __call__(self, index: int, height: int, width: int) -> torch.Tensor:
        """Mask number `index` at height x width: float32 (1, H, W), 1 = keep, 0 = hole."""
        if index < 0:
            raise ValueError(f"mask index must be >= 0, got {index}")
        if height < 1 or width < 1:
            raise ValueError(f"mask size must be positive, got {height}x{width}")
        rng = np.random.default_rng([self.seed, index])
        for _ in range(_MAX_ATTEMPTS):
            holes = self._holes(rng, height, width)  # numpy here: far cheaper than torch per draw
            if _in_bucket(holes.mean(), self.min_coverage, self.max_coverage):
                return torch.from_numpy(~holes).float()[None]
        raise RuntimeError(
            f"no '{self.kind}' mask with hole coverage in [{self.min_coverage}, {self.max_coverage}) after "
            f"{_MAX_ATTEMPTS} draws at {height}x{width}: this kind rarely reaches that coverage; widen the "
            "bounds or choose another kind ('thick' and 'box' cover most, 'thin' least)")

    def batch(self, indices: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Masks for `indices`, stacked: (B, 1, H, W)."""
        return torch.stack([self(int(i), height, width) for i in indices])


def stable_index(key: str) -> int:
    """A 64-bit integer from a sample key, the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class InpaintingDegradation:
    """Adds `mask` (B, 1, H, W; 1 = keep, 0 = hole) and `masked_image` = image * mask (holes
    become 0, mid-grey) to a batch, with masks from `masks`, or the shards' own masks: with
    `stored_key`, batch[stored_key] (B, H, W) ids read by data.label_maps from the `mask.png`
    members (nonzero = keep)."""

    def __init__(self, masks: MaskGenerator | None = None, stored_key: str | None = None):
        if (masks is None) == (stored_key is None):
            raise ValueError("InpaintingDegradation takes masks (a MaskGenerator) or stored_key (the batch entry of "
                             "the shards' masks, data.label_maps {<key>: mask.png}), exactly one of them")
        self.masks, self.stored_key = masks, stored_key

    def __call__(self, batch: dict, indices: Sequence[int] | None = None) -> dict:
        """`indices`: the mask index of each sample. By default a stable hash of each sample's
        `__key__`, so an image always gets the same mask (what evaluation wants); for new masks
        at every step pass e.g. step * batch_size + arange(batch_size)."""
        image = _batch_images(batch)
        if self.stored_key is not None:
            if self.stored_key not in batch:
                raise KeyError(f"the batch has no stored masks {self.stored_key!r}: set data.label_maps."
                               f"{self.stored_key}=mask.png")
            mask = (batch[self.stored_key] > 0)[:, None].to(device=image.device, dtype=image.dtype)
            return {**batch, "mask": mask, "masked_image": image * mask}
        if indices is None:
            if "__key__" not in batch:
                raise KeyError("the batch has no '__key__' entry to derive mask indices from; pass indices")
            indices = [stable_index(k) for k in batch["__key__"]]
        if len(indices) != image.shape[0]:
            raise ValueError(f"{len(indices)} mask indices for a batch of {image.shape[0]} images")
        mask = self.masks.batch(indices, *image.shape[-2:]).to(device=image.device, dtype=image.dtype)
        return {**batch, "mask": mask, "masked_image": image * mask}
