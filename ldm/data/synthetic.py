"""Built-in synthetic captioned dataset: coloured geometric shapes on plain backgrounds.

Needs no download and is a pure function of (seed, index), so any sample can be regenerated,
shards can be written in any order, and two machines produce the same bytes. Each image has
1-3 objects, a natural caption ("a small red circle above a blue square on a grey background")
and integer labels for the first-named object (shape, colour and their product class).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (225, 210, 180),
    "dark blue": (25, 35, 80),
    "light green": (180, 225, 180),
}
SIZES: dict[str, float] = {"small": 0.16, "large": 0.30}  # radius as a share of the image side
NUM_CLASSES = len(SHAPES) * len(COLORS)
LABEL_BACKGROUND = 0  # the label maps' id of the background; each shape has label_id(shape)
NUM_LABEL_IDS = len(SHAPES) + 1  # ids in a label map: the background and one per shape
_SUPERSAMPLE = 4  # draw large, then downscale: smooth edges at every resolution
_COLOR_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: what it is, where (centre in [0,1]^2) and how big."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float

    def phrase(self, with_size: bool) -> str:
        words = ([self.size] if with_size else []) + [self.color, self.shape]
        return " ".join(words)


@dataclass
class ShapeSample:
    """A generated sample: the picture, its caption and its labels."""

    image: Image.Image
    caption: str
    objects: list[ShapeObject]
    background: str
    labels: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict:
        """JSON-serialisable description, stored as the sample's .json member."""
        return {
            "caption": self.caption,
            "background": self.background,
            "objects": [vars(o) for o in self.objects],
            **self.labels,
        }


def class_label(shape: str, color: str) -> int:
    """The single integer class of a (shape, colour) pair, in [0, NUM_CLASSES)."""
    return SHAPES.index(shape) * len(COLORS) + _COLOR_NAMES.index(color)


def label_id(shape: str) -> int:
    """The id of a shape in the label maps (ShapesGenerator.label_map): 1 + its index in SHAPES."""
    return SHAPES.index(shape) + 1


def describe_class(label: int) -> str:
    """Inverse of class_label, as words: 'red circle'."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"class label {label} is outside [0, {NUM_CLASSES})")
    return f"{_COLOR_NAMES[label % len(COLORS)]} {SHAPES[label // len(COLORS)]}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "square":
        return ring(4, r * math.sqrt(2), math.pi / 4)
    if shape == "diamond":
        return ring(4, r * 1.15, -math.pi / 2)
    if shape == "triangle":
        return ring(3, r * 1.2, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r * 1.15, -math.pi / 2), ring(5, r * 0.5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Spatial relation of a to b along the axis where they are further apart (y grows down)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def make_caption(objects: list[ShapeObject], background: str) -> str:
    """Natural-language caption; sizes are named only where they tell objects apart or matter."""
    if len(objects) == 1:
        body = f"a {objects[0].phrase(True)}"
    elif len(objects) == 2:
        a, b = objects
        body = f"a {a.phrase(True)} {_relation(a, b)} a {b.phrase(True)}"
    else:
        parts = [f"a {o.phrase(True)}" for o in objects]
        body = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"{body} on a {background} background"


class ShapesGenerator:
    """Deterministic generator of captioned shape images.

    `generator[i]` depends only on (seed, i, resolution, max_objects, sizes), so datasets of any
    size can be written in parallel or resumed. Resolutions from 32 to 512 pixels are supported.
    `sizes` maps the size words of the captions to object radii (a share of the image side, below
    0.5); default SIZES. One size, e.g. {"large": 0.4}, gives scenes whose object nearly fills the
    image (the quickstart's data: shapes learnable in minutes on a CPU).
    """

    def __init__(self, resolution: int = 64, seed: int = 0, max_objects: int = 3,
                 sizes: Mapping[str, float] | None = None):
        if not 32 <= resolution <= 512:
            raise ValueError(f"resolution must be in [32, 512], got {resolution}")
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
        sizes = dict(SIZES if sizes is None else sizes)
        if not sizes or not all(isinstance(r, (int, float)) and 0 < r < 0.5 for r in sizes.values()):
            raise ValueError(f"sizes must map size words to radii in (0, 0.5) of the image side, got {sizes}")
        self.resolution, self.seed, self.max_objects = resolution, seed, max_objects
        self.sizes = {name: float(r) for name, r in sizes.items()}
        self._smallest = min(self.sizes, key=self.sizes.get)

    def _layout(self, rng: np.random.Generator) -> tuple[list[ShapeObject], str]:
        n = int(rng.integers(1, self.max_objects + 1))
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        # No object shares the background's colour family (blue on dark blue); objects keep apart.
        objects: list[ShapeObject] = []
        for _ in range(n):
            size = list(self.sizes)[int(rng.integers(len(self.sizes)))] if n < 3 else self._smallest
            placed = self._place(rng, size, objects) or self._place(rng, self._smallest, objects)
            if placed is None:  # crowded: shrink the scene rather than draw overlapping shapes
                break
            size, cx, cy = placed
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            allowed = [c for c in _COLOR_NAMES if c not in background]
            color = allowed[int(rng.integers(len(allowed)))]
            objects.append(ShapeObject(shape, color, size, cx, cy))
        return objects, background

    def _place(self, rng: np.random.Generator, size: str, objects: list[ShapeObject]) -> tuple[str, float, float] | None:
        r = self.sizes[size]
        for _attempt in range(50):
            cx, cy = rng.uniform(r, 1 - r, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + self.sizes[o.size] for o in objects):
                return size, float(cx), float(cy)
        return None

    def _draw(self, objects: list[ShapeObject], mode: str, background, fill) -> Image.Image:
        """The scene at _SUPERSAMPLE x the resolution, each object filled with `fill(object)`."""
        side = self.resolution * _SUPERSAMPLE
        canvas = Image.new(mode, (side, side), background)
        draw = ImageDraw.Draw(canvas)
        for o in objects:
            cx, cy, r = o.cx * side, o.cy * side, self.sizes[o.size] * side
            if o.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill(o))
            else:
                draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill(o))
        return canvas

    def label_map(self, sample: ShapeSample) -> np.ndarray:
        """The sample's label map: (resolution, resolution) uint8 ids, LABEL_BACKGROUND (0) for the
        background and label_id(shape) (1..6) for each object's shape.

        Drawn from the same polygons as the image, on the same supersampled canvas; each pixel
        takes the id that covers most of its _SUPERSAMPLE^2 sub-pixels (ties: the lower id). The
        image downsamples that canvas with an antialiasing filter, so an edge pixel of the image
        blends the two colours while the map gives it one id, the majority's."""
        ids = np.asarray(self._draw(sample.objects, "L", LABEL_BACKGROUND, lambda o: label_id(o.shape)))
        n, k = self.resolution, _SUPERSAMPLE
        blocks = ids.reshape(n, k, n, k).transpose(0, 2, 1, 3).reshape(n, n, k * k)
        present = np.unique(ids)
        votes = np.stack([(blocks == i).sum(-1) for i in present])  # (ids present, n, n)
        return present[votes.argmax(0)].astype(np.uint8)

    def __getitem__(self, index: int) -> ShapeSample:
        if index < 0:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        objects, background = self._layout(rng)
        canvas = self._draw(objects, "RGB", BACKGROUNDS[background], lambda o: COLORS[o.color])
        image = canvas.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS)
        first = objects[0]
        labels = {
            "shape": SHAPES.index(first.shape),
            "color": _COLOR_NAMES.index(first.color),
            "class_label": class_label(first.shape, first.color),
            "n_objects": len(objects),
        }
        return ShapeSample(image, make_caption(objects, background), objects, background, labels)
