"""What the caption metrics (prompt accuracy, CLIP score) share: they score generated images
against the captions they were generated from, with a frozen network in eval mode."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from torch import Tensor
from torchmetrics import Metric


class CaptionedMetric(Metric):
    """A torchmetrics Metric over (generated images, their captions); real batches do not enter.

    Subclasses implement `score_batch(images, captions)`; `update(images, real, captions=...)` is the
    interface ldm.metrics.collection calls. The scoring network stays in eval mode whatever the
    metric's mode (no dropout, no batch-norm statistics that follow the scored batch).
    """

    label = "this metric"  # how error messages name the metric

    def train(self, mode: bool = True) -> CaptionedMetric:
        return super().train(False)

    def update(self, images: Tensor, real: bool, captions: Sequence[str] | None = None) -> None:  # type: ignore[override]
        """Score a generated batch against its captions; a real batch is ignored."""
        if real:
            return
        if captions is None or len(captions) != len(images):
            raise ValueError(f"{self.label} needs the caption of every generated image: got {len(images)} images "
                             f"and {'no' if captions is None else len(captions)} captions")
        self.score_batch(images, list(captions))

    @abstractmethod
    def score_batch(self, images: Tensor, captions: list[str]) -> None:
        """Add the scores of generated `images` against `captions` (one each) to the states."""
