"""The one contract every scorer follows.

A scorer turns one prunable layer into a 1-D float tensor over the layer's output channels,
**higher = more important = keep**. It works like a streaming metric:

    scorer.reset(layer)                # a new layer
    for batch in class_batches:        # one class at a time (data-driven scorers only)
        scorer.update(batch)
    scores = scorer.compute()          # [C], float32, higher = keep

or in one call: ``scores = scorer(layer, class_batches)``.

Chunks: a class may also arrive as several consecutive `update` calls with the same
`class_index` (chunks of its images, in order); the class ends at the next class index,
`compute()` or `state()`. Scores are bit-identical however a class is chunked: data scorers
reduce each chunk to per-image statistics and do their class-level reduction once the class
ends (`scoring.chunked.ChunkedScorer`). So the caller holds one chunk's units, not one
class's. A scorer that needs a whole class in one call sets `whole_class = True` and is
given one batch per class. (Two classes in a row with the same index are therefore one
class: give consecutive classes different indices.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ScorerInfo:
    """What `list_scorers()` and `--help` show about a scorer.

    needs_data False: the scorer reads the model's parameters only (never images, never
    BatchNorm's running statistics), so `python -m prune` gives it no scoring images and
    re-estimates BatchNorm statistics once, before the last layer, not after every layer."""

    name: str
    needs_data: bool
    description: str


@dataclass(frozen=True)
class LayerSpec:
    """The layer being scored.

    model: the whole network (already pruned at shallower layers in a progressive run).
    conv: the layer's conv module; its output channels are the units.
    name: qualified module name of `conv` inside `model`.
    example: an input [1, 3, H, W] the model takes, for scorers that trace the model
        (torch-pruning's criteria); None if the caller has none (they then use a scoring image).
    """

    model: nn.Module
    conv: nn.Conv2d
    name: str
    example: torch.Tensor | None = None

    @property
    def num_channels(self) -> int:
        return int(self.conv.out_channels)


@dataclass(frozen=True)
class ClassBatch:
    """Activations of one class at one layer, or of a chunk of its images (see the module doc).

    class_index: the class these images belong to.
    images: [N, 3, H, W] network inputs (what produced the activations).
    activations: [N, C, m, m] the layer's units after their activation (ReLU); [N, 0, 0, 0] for
      a scorer that reads no units (`Scorer.reads_units` False).
    """

    class_index: int
    images: torch.Tensor
    activations: torch.Tensor


class Scorer(ABC):
    """Base class: subclasses set `info` and implement `reset`/`update`/`compute`."""

    info: ClassVar[ScorerInfo]
    whole_class: ClassVar[bool] = False
    """True: `update` must get each class in one batch; False: chunks of a class are fine."""
    reads_units: ClassVar[bool] = True
    """False: `update` never reads `activations`, only the images (through the model itself), so
    the pipeline gives it each class's images whole with no units ([N, 0, 0, 0]): no forward for
    units, no prefix cache held for it."""
    reads_only_units: ClassVar[bool] = False
    """True: `update` reads only its batch (never the model), so the pipeline may run it on another
    thread while the next chunk's forward runs (one update at a time, in order: the same scores)."""

    def check(self, model: nn.Module, *, classes: int, samples_per_class: int) -> None:
        """Raise ValueError (one line naming the fix) if this scorer cannot score `model` from
        `classes` classes x `samples_per_class` images each; called before any scoring.
        The default accepts everything."""

    def check_maps(self, sizes: Mapping[str, tuple[int, int]]) -> None:
        """Raise ValueError (one line naming the fix) if this scorer cannot score units whose maps
        have these (height, width) per conv name (each prunable conv's output on the run's input
        size; pruning channels does not change them); called before any scoring. The default
        accepts every size."""

    def reset(self, layer: LayerSpec) -> None:
        """Start scoring `layer`; forget earlier state."""
        self.layer = layer

    def update(self, batch: ClassBatch) -> None:
        """Take one class's activations, or the next chunk of them (same `class_index` as the
        previous call; unless `whole_class`). Weight-only scorers ignore them."""

    @abstractmethod
    def compute(self) -> torch.Tensor:
        """Scores [C] (float32, CPU), higher = keep."""

    # Exact sharding by class (multi-process scoring). Scorers whose state is a sum over
    # classes override both: `state()` after updating with one class, then `merge(states)` on
    # a scorer just reset, must equal updating with every class in that order.

    def state(self) -> Any:
        """The state the updates so far left, the last class ended (only for class-shardable scorers)."""
        raise NotImplementedError(f"scorer {self.info.name!r} cannot be sharded by class")

    def merge(self, states: Sequence[Any]) -> None:
        """Set, on a scorer just reset, the state of all classes from each class's `state()`."""
        raise NotImplementedError(f"scorer {self.info.name!r} cannot be sharded by class")

    @classmethod
    def shardable(cls) -> bool:
        """True if `state`/`merge` are implemented, so classes can be scored on several processes."""
        return cls.merge is not Scorer.merge

    @torch.no_grad()
    def __call__(self, layer: LayerSpec, batches: Iterable[ClassBatch] = ()) -> torch.Tensor:
        self.reset(layer)
        for batch in batches:
            self.update(batch)
        return self.compute()
