"""Prompt accuracy: does a generated shapes image show what its caption names?

A trained ShapeClassifier (ldm.metrics.shape_classifier) says which shapes and colours are
present (sigmoid > threshold); the caption says which are named (ldm.metrics.prompts). Per image:
- prompt hit: every named shape and every named colour is predicted present;
- shape hit / colour hit: the same for the shapes / the colours alone.
The metric reports the shares of hits over all images (`prompt_accuracy`, `shape_accuracy`,
`color_accuracy`) and `prompt_accuracy_chance`: the prompt accuracy the same images would get
against captions drawn at random from the evaluated set, i.e. what a generator that ignores its
prompt but draws these pictures scores. It is computed exactly from two histograms (predicted and
named label sets), so it costs no extra classifier pass and synchronises as sums.

Only presence is checked, not counts, sizes or positions, and unnamed extra objects are not
penalised.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ldm.metrics.captioned import CaptionedMetric
from ldm.metrics.prompts import NUM_LABELS, NUM_SHAPES, caption_labels
from ldm.metrics.shape_classifier import ClassifierMismatchError

_NUM_SETS = 2 ** NUM_LABELS  # every subset of the labels, as a bit code


def all_named_present(predicted: Tensor, named: Tensor) -> Tensor:
    """(N,) bool: whether every label named in (N, L) bool `named` is in (N, L) bool `predicted`."""
    return (predicted | ~named).all(dim=1)


def set_codes(labels: Tensor) -> Tensor:
    """(N,) int64 bit codes of (N, L) bool label sets (label l is bit l)."""
    bits = torch.arange(labels.shape[1], device=labels.device)
    return (labels.long() << bits).sum(dim=1)


def chance_accuracy(predicted_counts: Tensor, named_counts: Tensor) -> float:
    """Share of all (image, caption) pairs whose caption's named set is within the image's predicted
    set, from the counts of each predicted and named set (index = set_codes code, length 2^L)."""
    covered = named_counts.double().clone()  # -> covered[S]: captions whose named set is a subset of S
    for bit in range(int(len(covered)).bit_length() - 1):
        # index = high * 2^(bit+1) + b * 2^bit + low: sets with the bit also cover those without it
        view = covered.view(-1, 2, 2 ** bit)
        view[:, 1] += view[:, 0]
    pairs = predicted_counts.sum().double() * named_counts.sum().double()
    return float((predicted_counts.double() * covered).sum() / pairs)


class PromptAccuracy(CaptionedMetric):
    """Prompt, shape and colour accuracy of generated images against their captions (see module doc).

    classifier: a ShapeClassifier (or any module with `resolution` mapping images to (N, NUM_LABELS)
        logits); it stays in eval mode and scores images of its resolution only.
    update(images, real, captions): generated (N, 3, H, W) images in [-1, 1] (or uint8) with the
        captions they were generated from; real batches are ignored (the real side is the captions).
    """

    label = "prompt accuracy"
    row_key = "prompt_labels"

    full_state_update = False
    higher_is_better = True

    def __init__(self, classifier: nn.Module, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
        self.classifier = classifier.eval()
        self.threshold = threshold
        for name in ("n", "prompt_hits", "shape_hits", "color_hits"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted_sets", torch.zeros(_NUM_SETS, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("named_sets", torch.zeros(_NUM_SETS, dtype=torch.long), dist_reduce_fx="sum")

    def rows(self, images: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """(N, NUM_LABELS) bool: the labels the classifier finds in each generated image."""
        size = self.classifier.resolution
        if tuple(images.shape[-2:]) != (size, size):
            raise ClassifierMismatchError(
                f"the prompt-accuracy classifier was trained on {size} px images, these are "
                f"{tuple(images.shape[-2:])}: train one at their size with "
                f"`python -m ldm.cli.train_classifier --resolution {images.shape[-1]} --out <folder>`")
        with torch.no_grad():
            return torch.sigmoid(self.classifier(images).float()) > self.threshold

    def add_rows(self, predicted: Tensor, captions: list[str]) -> None:
        """Count the hits of the predicted label sets against the labels their captions name."""
        named = caption_labels(captions).to(predicted.device)
        self.n += len(predicted)
        self.prompt_hits += all_named_present(predicted, named).sum()
        self.shape_hits += all_named_present(predicted[:, :NUM_SHAPES], named[:, :NUM_SHAPES]).sum()
        self.color_hits += all_named_present(predicted[:, NUM_SHAPES:], named[:, NUM_SHAPES:]).sum()
        self.predicted_sets += torch.bincount(set_codes(predicted), minlength=_NUM_SETS)
        self.named_sets += torch.bincount(set_codes(named), minlength=_NUM_SETS)

    def compute(self) -> dict[str, Tensor]:
        """{'prompt_accuracy', 'shape_accuracy', 'color_accuracy', 'prompt_accuracy_chance'} over all ranks."""
        n = int(self.n)
        if n == 0:
            raise RuntimeError("prompt accuracy saw no generated images: update(images, real=False, captions=...) "
                               "was never called")
        result = {f"{k}_accuracy": torch.tensor(int(getattr(self, f"{k}_hits")) / n, dtype=torch.float64)
                  for k in ("prompt", "shape", "color")}
        result["prompt_accuracy_chance"] = torch.tensor(chance_accuracy(self.predicted_sets, self.named_sets),
                                                        dtype=torch.float64)
        return result
