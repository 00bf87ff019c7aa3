"""What the caption metrics (prompt accuracy, CLIP score) share: they score generated images
against the captions they were generated from, with a frozen network in eval mode."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from torch import Tensor
from torchmetrics import Metric

from ldm.metrics.rows import Rows, rows_or_run


class CaptionedMetric(Metric):
    """A torchmetrics Metric over (generated images, their captions); real batches do not enter.

    Subclasses implement `rows(images, captions)` (the network's per-image outputs, see
    ldm.metrics.rows) and `add_rows(rows, captions)` (adding them to the states);
    `update(images, real, captions=...)` is the interface ldm.metrics.collection calls. The scoring
    network stays in eval mode whatever the metric's mode (no dropout, no batch-norm statistics that
    follow the scored batch).
    """

    label = "this metric"  # how error messages name the metric
    row_key = ""  # the key of its rows (ldm.metrics.collection.batch_rows); no other metric shares them
    takes_real = False

    @property
    def row_network(self) -> CaptionedMetric:
        """The network that makes this metric's rows: its own."""
        return self

    def train(self, mode: bool = True) -> CaptionedMetric:
        return super().train(False)

    def update(self, images: Tensor | Rows, real: bool, captions: Sequence[str] | None = None) -> None:  # type: ignore[override]
        """Score a generated batch (or add its precomputed rows) against its captions; a real batch is ignored."""
        if real:
            return
        if captions is None or len(captions) != len(images):
            raise ValueError(f"{self.label} needs the caption of every generated image: got {len(images)} images "
                             f"and {'no' if captions is None else len(captions)} captions")
        captions = list(captions)
        self.add_rows(rows_or_run(images, lambda x: self.rows(x, captions)), captions)

    @abstractmethod
    def rows(self, images: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """What the network makes of each generated image (against its caption), one row each."""

    @abstractmethod
    def add_rows(self, rows: Tensor, captions: list[str]) -> None:
        """Add the rows of generated images with their `captions` (one each) to the states."""
