"""A small CNN that says which shapes and colours are in a shapes image, and its files.

Multi-label: one logit per label of ldm.metrics.prompts.LABELS (6 shapes, then 8 colours), trained
with binary cross-entropy (ldm.cli.train_classifier). The network is fully convolutional with
global average and max pooling, so it runs at any size; it is trained at one resolution and
scores images of that resolution (about log2(resolution / 8) stride-2 stages, so the last
feature map is ~8 px and a large object spans a few cells whatever the resolution).

A classifier is a folder with `classifier.safetensors` (weights) and `classifier.json` (its
settings: resolution, width, label vocabulary, how it was trained, held-out accuracy).
load_classifier refuses a folder whose settings do not fit: another label vocabulary than the
generator's, another resolution than asked for, or weights of another architecture.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.data.synthetic import SHAPES
from ldm.metrics.features import FeatureExtractor, images_to_uint8, weights_fingerprint
from ldm.metrics.prompts import COLOR_NAMES, NUM_LABELS
from ldm.utils.checkpoint import load_state_dict_file, load_strict, save_safetensors

FORMAT = "ldm-shape-classifier"
WEIGHTS, SETTINGS = "classifier.safetensors", "classifier.json"


class ClassifierMismatchError(ValueError):
    """A classifier folder does not fit what it is asked to score."""


def num_stages(resolution: int) -> int:
    """Stride-2 stages that bring `resolution` down to about 8 px (at least 1)."""
    return max(1, round(math.log2(resolution / 8)))


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ShapeClassifier(nn.Module):
    """Label logits (N, NUM_LABELS) of images (N, 3, H, W): uint8, or float in [-1, 1].

    Float inputs are quantised to uint8 first (ldm.metrics.features.images_to_uint8), so a sample
    tensor and its saved PNG get the same answer, as the training images are PNG-like uint8.
    resolution: the image size it is trained for (sets the depth); width: channels of the stem
    (stage i has width * 2^min(i, 2)).
    """

    def __init__(self, resolution: int, width: int = 16):
        super().__init__()
        if not 32 <= resolution <= 256:
            raise ValueError(f"resolution must be in [32, 256] px, got {resolution}")
        self.resolution, self.width = resolution, width
        # A stride-2 stem: the full-resolution convolutions would cost most of the compute.
        layers, c = _conv(3, width, 2), width
        for stage in range(1, num_stages(resolution)):
            c_out = width * 2 ** min(stage, 2)
            layers += _conv(c, c_out, 2) + _conv(c_out, c_out, 1)
            c = c_out
        self.body = nn.Sequential(*layers, *_conv(c, c, 1))
        # Average pooling sees how much of a colour there is, max pooling whether a small object is anywhere.
        self.head = nn.Linear(2 * c, NUM_LABELS)

    @property
    def settings(self) -> dict[str, Any]:
        """What the weights belong to: architecture and label vocabulary."""
        return {"format": FORMAT, "resolution": self.resolution, "width": self.width, "shapes": list(SHAPES),
                "colors": list(COLOR_NAMES)}

    def pooled(self, images: Tensor) -> Tensor:
        """(N, 2 x last width) features before the head: the body's output, average and max pooled."""
        h = self.body(images_to_uint8(images).float() / 127.5 - 1)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """(N, NUM_LABELS) logits; sigmoid > 0.5 means 'present'."""
        return self.head(self.pooled(images))


def save_classifier(model: ShapeClassifier, folder: str | Path, extra: dict[str, Any]) -> Path:
    """Write the weights and settings (plus `extra`: training settings, held-out accuracy) into `folder`."""
    folder = Path(folder)
    save_safetensors(model.state_dict(), folder / WEIGHTS)
    (folder / SETTINGS).write_text(json.dumps({**model.settings, **extra}, indent=1))
    return folder


def read_settings(folder: str | Path) -> dict[str, Any]:
    """The settings JSON of a classifier folder."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"no {SETTINGS} in {folder}: train a classifier with "
                                "`python -m ldm.cli.train_classifier --resolution <px> --out <folder>`")
    return json.loads(path.read_text())


def load_classifier(folder: str | Path, resolution: int | None = None) -> ShapeClassifier:
    """The classifier saved in `folder`, in eval mode; refuses settings that do not fit (see module doc).
    resolution: the image size it will score (None: any; it is then checked on each batch)."""
    settings = read_settings(folder)
    retrain = f"retrain it: python -m ldm.cli.train_classifier --resolution {resolution or '<px>'} --out <folder>"
    if settings.get("format") != FORMAT:
        raise ClassifierMismatchError(f"{folder}/{SETTINGS} is not a shape classifier (format "
                                      f"{settings.get('format')!r}, expected {FORMAT!r})")
    vocab = {"shapes": list(SHAPES), "colors": list(COLOR_NAMES)}
    for key, expected in vocab.items():
        if settings.get(key) != expected:
            raise ClassifierMismatchError(f"{folder} was trained for {key} {settings.get(key)}, the shapes "
                                          f"generator now has {expected}; {retrain}")
    if resolution is not None and settings["resolution"] != resolution:
        raise ClassifierMismatchError(f"{folder} was trained on {settings['resolution']} px images and cannot "
                                      f"score {resolution} px ones; {retrain}")
    model = ShapeClassifier(settings["resolution"], settings["width"])
    load_strict(model, load_state_dict_file(Path(folder) / WEIGHTS), source=str(Path(folder) / WEIGHTS))
    return model.eval()


class ShapeFeatures(FeatureExtractor):
    """Features that know the shapes data: a trained shape classifier's pooled features (the
    penultimate layer, average and max pooled: 2 x its last width), as Inception's pool features
    are for photographs. FID, KID and precision/recall on them measure what the data is about
    (which shapes, colours, sizes, how sharp), where random-conv features mostly see colour
    statistics. Low-dimensional (128 for the 64 px classifier), so a few hundred samples give a
    full-rank covariance. No class logits for IS: the classifier is multi-label.

    classifier: a classifier folder (ldm.cli.train_classifier), e.g. assets/classifiers/shapes-64;
    images must have its resolution.
    """

    def __init__(self, classifier: str | Path):
        model = load_classifier(classifier)
        width = model.head.in_features
        super().__init__("shape-classifier-pool", width, {"resolution": model.resolution, "width": model.width,
                                                          "layer": "pool (mean, max)",
                                                          "weights": weights_fingerprint(model)})
        self.classifier = model.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, R, R) images (uint8 or float in [-1, 1]) -> (N, num_features) float32."""
        r = self.classifier.resolution
        if tuple(images.shape[-2:]) != (r, r):
            raise ValueError(f"shape-classifier features need {r} x {r} px images (the classifier's resolution), "
                             f"got {tuple(images.shape[-2:])}; use a classifier trained at this size "
                             f"(python -m ldm.cli.train_classifier --resolution {images.shape[-1]} --out <folder>)")
        return self.classifier.pooled(images).float()
