"""Where a run keeps each layer's scores, so that a resumed run does not score a layer twice.

`select_and_prune` asks `store.get(i, group)` before scoring layer i and calls
`store.put(i, group, scores)` after. `NO_STORE` keeps nothing; `FileScoreStore` keeps one file
per layer in `<out>/cache/`; `RememberingStore` also keeps what this process scored in memory
(a budget's `global` allocation scores every layer before the one-shot selection reuses them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from prune.core import distributed
from prune.outputs.cache_file import CacheFile

SCORES_FORMAT = "topoprune/scores/v1"


class ScoredLayer(Protocol):
    """What a store needs of a layer (a `PrunableGroup`): its name and channel count."""

    name: str
    num_channels: int


class ScoreStore(Protocol):
    """Scores [C] of layer i (higher = keep), kept between runs."""

    def get(self, i: int, group: ScoredLayer) -> torch.Tensor | None: ...

    def put(self, i: int, group: ScoredLayer, scores: torch.Tensor) -> None: ...


class _NoStore:
    """Keeps nothing: every layer is scored."""

    def get(self, i: int, group: ScoredLayer) -> torch.Tensor | None:
        return None

    def put(self, i: int, group: ScoredLayer, scores: torch.Tensor) -> None:
        return None


NO_STORE: ScoreStore = _NoStore()


def fits_layer(scores: object, channels: int) -> bool:
    """True if `scores` can be a layer's scores: a 1-D finite float tensor of length `channels`."""
    return (
        isinstance(scores, torch.Tensor) and scores.dim() == 1 and scores.numel() == channels
        and scores.is_floating_point() and bool(torch.isfinite(scores).all())
    )


class FileScoreStore:
    """One file per layer, `<out>/cache/scores-<prefix><i>.pt` (a `CacheFile`; `prefix` tells an
    iterative run's steps apart): read on resume, written after scoring.

    Rank 0 reads and writes the files; what it finds is broadcast to every rank (all ranks call
    `get` and `put` in the same order). A file that is unreadable or does not fit its layer
    (`fits_layer`) counts as absent, so that layer is scored again.
    """

    def __init__(self, out: Path, *, resume: bool, world: distributed.World, prefix: str = "") -> None:
        self.out, self.resume, self.world, self.prefix = Path(out), resume, world, prefix

    def _file(self, i: int) -> CacheFile:
        return CacheFile(self.out / "cache" / f"scores-{self.prefix}{i:03d}.pt", SCORES_FORMAT, resume=self.resume,
                         world=self.world)

    def get(self, i: int, group: ScoredLayer) -> torch.Tensor | None:
        blob = self._file(i).read()
        if blob is None:
            return None
        scores = blob.get("scores")
        return scores if blob.get("layer") == group.name and fits_layer(scores, group.num_channels) else None

    def put(self, i: int, group: ScoredLayer, scores: torch.Tensor) -> None:
        self._file(i).write({"layer": group.name, "scores": scores})


class RememberingStore:
    """`inner`, with every layer's scores got or put through it also kept in memory for this run."""

    def __init__(self, inner: ScoreStore) -> None:
        self.inner = inner
        self._kept: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, i: int, group: ScoredLayer) -> torch.Tensor | None:
        kept = self._kept.get((i, group.name))
        if kept is not None and kept.numel() == group.num_channels:
            return kept
        found = self.inner.get(i, group)
        if found is not None:
            self._kept[i, group.name] = found
        return found

    def put(self, i: int, group: ScoredLayer, scores: torch.Tensor) -> None:
        self._kept[i, group.name] = scores
        self.inner.put(i, group, scores)
