"""What a shapes caption names: its object shapes and colours, as multi-hot label vectors.

The label vocabulary is the synthetic generator's (ldm.data.synthetic): the 6 SHAPES, then the 8
object COLORS, 14 labels in all. Captions follow its grammar, "a [small|large] <colour> <shape>"
phrases joined by relations or commas, then "on a <background> background". An object colour
always stands right before a shape word, so matching "<colour> <shape>" pairs finds exactly the
objects; background names ("dark blue", "light green") never precede a shape and do not count.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.data.synthetic import COLORS, SHAPES, ShapeObject

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
LABELS: tuple[str, ...] = (*SHAPES, *COLOR_NAMES)  # classifier outputs, in this order
NUM_SHAPES, NUM_LABELS = len(SHAPES), len(LABELS)

# "<colour> <shape>": an object of a caption (group 1 its colour, group 2 its shape)
OBJECT_PHRASE = re.compile(rf"\b({'|'.join(COLOR_NAMES)})\s+({'|'.join(SHAPES)})s?\b")


@dataclass(frozen=True)
class Named:
    """The shapes and colours a caption names (each once, however often it is named)."""

    shapes: frozenset[str]
    colors: frozenset[str]


def parse_caption(caption: str) -> Named:
    """The object shapes and colours named in a shapes caption.

    Raises ValueError when it names none: prompt accuracy is defined for captions of the
    synthetic shapes grammar only, and a caption without objects would count as trivially met.
    """
    pairs = OBJECT_PHRASE.findall(caption.lower())
    if not pairs:
        raise ValueError(f"caption {caption!r} names no '<colour> <shape>' object of the shapes vocabulary "
                         f"(colours {COLOR_NAMES}, shapes {SHAPES}); prompt accuracy scores captions of the "
                         "synthetic shapes data (ldm.data.synthetic) only")
    return Named(frozenset(shape for _, shape in pairs), frozenset(color for color, _ in pairs))


def label_vector(shapes: Iterable[str], colors: Iterable[str]) -> Tensor:
    """(NUM_LABELS,) bool: which of LABELS are among `shapes` and `colors`."""
    present = set(shapes) | set(colors)
    return torch.tensor([label in present for label in LABELS], dtype=torch.bool)


def caption_labels(captions: Sequence[str]) -> Tensor:
    """(N, NUM_LABELS) bool: the labels each caption names."""
    named = [parse_caption(c) for c in captions]
    if not named:
        return torch.zeros(0, NUM_LABELS, dtype=torch.bool)
    return torch.stack([label_vector(n.shapes, n.colors) for n in named])


def object_labels(objects: Sequence[ShapeObject]) -> Tensor:
    """(NUM_LABELS,) bool: the labels of the objects drawn in a synthetic image (the training target)."""
    return label_vector((o.shape for o in objects), (o.color for o in objects))
