"""Per-image rows: what a metric's network makes of each image, apart from how the metric adds
them up.

Each metric of ldm.metrics.collection runs a network on the images it is given (the feature
extractor, its logits head, the shape classifier, CLIP) and adds the outputs to its states.
`metric.rows(images, captions)` returns those outputs, one row per image, and
`metric.update(Rows(rows), real, ...)` adds them exactly as `metric.update(images, real, ...)`
would have. So the networks can run where the images are made (each rank of a multi-GPU
evaluation, batch by batch, the rows stored on disk) and the metrics be computed elsewhere from
the stored rows, with the numbers of one process.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Rows:
    """Rows computed earlier by `metric.rows(...)`, passed to `metric.update` in place of images."""

    values: Tensor

    def __len__(self) -> int:
        return len(self.values)


def rows_or_run(x: Tensor | Rows, network: Callable[[Tensor], Tensor]) -> Tensor:
    """The rows of `x`: its values when they were computed earlier, else `network(x)`."""
    return x.values if isinstance(x, Rows) else network(x)
