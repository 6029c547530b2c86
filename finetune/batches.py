"""In-memory batches of an (images, labels) pair: in order (evaluation) or in a fresh seeded
order on every pass (training). Both are iterables of (images [b, ...], labels [b]) like a
DataLoader, so `finetune.train.fit` and `finetune.metrics.evaluate` take them as they are."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""(images, labels) batches: a DataLoader, `in_order(...)` or `Shuffled(...)`."""


def in_order(images: torch.Tensor, labels: torch.Tensor, *, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) in consecutive batches of `batch_size` (views, no copy)."""
    return list(zip(images.split(batch_size), labels.split(batch_size)))


@dataclass(frozen=True, eq=False)
class Shuffled:
    """(images [N, ...], labels [N]) in batches of `batch_size`, in a new order on every pass.

    Each pass draws one `torch.randperm(N, generator=generator)`, so passes are seeded by the
    generator's state; the last batch may be smaller.
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    generator: torch.Generator

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator)
        for i in range(0, len(self.labels), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.images[idx], self.labels[idx]
