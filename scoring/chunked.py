"""`ChunkedScorer`: a data scorer fed a class in chunks, with the scores of the whole class.

    update(chunk of class k)   → per_image(chunk): statistics [n, ...] kept in order
    ...                           (the same class_index: the next chunk of class k)
    update(class j ≠ k), compute() or state()
                               → end_class(): reduce_class(k, statistics of all N images [N, ...])

Per-image statistics do not depend on which other images share a chunk, and the class-level
reduction runs once on their concatenation, so the floating-point operations, and the
scores, are those of one update with the whole class.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from scoring.base import ClassBatch, LayerSpec, Scorer


def concat(parts: list[Any]) -> Any:
    """Per-image statistics of consecutive chunks joined along dim 0 (torch or numpy)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return torch.cat(parts)


class ChunkedScorer(Scorer):
    """Subclasses implement `per_image` and `reduce_class`, and call `end_class()` at the start
    of `compute()` and `state()`."""

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._open: int | None = None  # the class whose chunks are in self._parts
        self._parts: list[Any] = []

    def update(self, batch: ClassBatch) -> None:
        """Add a chunk of class `batch.class_index`; a new class index ends the previous class."""
        if getattr(self, "layer", None) is None:
            raise ValueError(f"{self.info.name}: call reset(layer) before update()")
        if self._open is not None and int(batch.class_index) != self._open:
            self.end_class()
        self._parts.append(self.per_image(batch))
        self._open = int(batch.class_index)

    def end_class(self) -> None:
        """Reduce the open class (if any) from its images' statistics, in image order."""
        if getattr(self, "_open", None) is None:
            return
        k, stats = self._open, concat(self._parts)
        self._open, self._parts = None, []
        self.reduce_class(k, stats)

    @abstractmethod
    def per_image(self, batch: ClassBatch) -> Any:
        """A chunk of n images → statistics with n rows (tensor or array), checked."""

    @abstractmethod
    def reduce_class(self, class_index: int, stats: Any) -> None:
        """Fold one whole class's statistics (N rows, image order) into the scorer's state."""


class PerClassSums(ChunkedScorer):
    """A chunked scorer whose state is, per class, the sum of its images' statistics [C] and their
    count; shards merge by adding them, and `pooled_mean` adds the classes in class order, so
    chunks and shards give bit-identical scores. Subclasses implement `per_image` ([n, C])."""

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def reduce_class(self, class_index: int, stats: torch.Tensor) -> None:
        """Statistics [N, C] of one class → their sum [C] and N into class `class_index`'s totals."""
        self._sums[class_index] = self._sums.get(class_index, 0) + stats.sum(dim=0)
        self._counts[class_index] = self._counts.get(class_index, 0) + stats.shape[0]

    def state(self) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
        """Per-class sums [C] and image counts seen so far."""
        self.end_class()
        return dict(self._sums), dict(self._counts)

    def merge(self, states: Sequence[tuple[dict[int, torch.Tensor], dict[int, int]]]) -> None:
        for sums, counts in states:
            for k, v in sums.items():
                self._sums[k] = self._sums.get(k, 0) + v
                self._counts[k] = self._counts.get(k, 0) + counts[k]

    def pooled_sum(self) -> torch.Tensor:
        """The statistics of every image of every class seen, summed in class order (float64)."""
        self.end_class()
        if not getattr(self, "_sums", {}):
            raise ValueError(f"{self.info.name}: no activations seen; call update() with class batches")
        return sum(self._sums[k] for k in sorted(self._sums))

    def pooled_mean(self) -> torch.Tensor:
        """The mean statistic [C] float64 over every image of every class seen."""
        return self.pooled_sum() / sum(self._counts.values())

    def compute(self) -> torch.Tensor:
        """Scores [C] float32: the pooled mean statistic (subclasses whose score is another reduction override it)."""
        return self.pooled_mean().float()
