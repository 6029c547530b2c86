"""FLOPs of a pruned structure read off its layers' weight shapes, without pruning a copy for it.

fvcore counts a convolution or linear layer as (its weight's elements) × (the positions it is
applied at: output pixels, input pixels for a transposed convolution, rows for a linear layer), and
removing channels changes the weights' shapes, never the positions. Removing n channels of a group
changes each layer's weight shape by n / n₀ times what removing n₀ of them changed, and the changes
of different groups add: `ShapeCost.measure` reads both from two pruned copies of the model (each
group's change recorded as torch-pruning makes it) and keeps the model only where it counts both
copies exactly as fvcore does. A budget's search then asks thousands of structures at the price of
arithmetic (`prune.pipeline.allocation.StructureCost`); the plan it settles on is counted on a copy
once more (`StructureCost.confirmed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from prune.pipeline.counting import count_cost
from prune.pipeline.surgery import Surgeon, legal_count

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GroupChange:
    """What removing `probe` channels of one group did: the change of each layer's weight shape it touched."""

    probe: int
    layers: tuple[tuple[str, Shape], ...]


@dataclass(frozen=True)
class ShapeCost:
    """positions[name]: where the counted layer `name` is applied (its MACs per weight element);
    shapes[name]: its unpruned weight shape; changes[g]: group g's `GroupChange`."""

    positions: dict[str, int]
    shapes: dict[str, Shape]
    changes: tuple[GroupChange, ...]

    def flops(self, removed: Sequence[int]) -> int | None:
        """FLOPs (2 × MACs) with `removed[g]` output channels of group g gone (legal counts, as
        `Surgeon.pruned_copy` removes them); None where a change does not scale to a whole number."""
        shapes = {name: list(shape) for name, shape in self.shapes.items()}
        for change, n in zip(self.changes, removed):
            if n == 0:
                continue
            if change.probe == 0:
                return None  # the probe removed none of this group: its change is unknown
            for name, delta in change.layers:
                for dim, d in enumerate(delta):
                    step, rest = divmod(d * n, change.probe)
                    if rest:
                        return None
                    shapes[name][dim] += step
        return 2 * sum(self.positions[name] * math.prod(shape) for name, shape in shapes.items())

    @classmethod
    def measure(cls, surgeon: Surgeon, input_size: int) -> ShapeCost | None:
        """The shape model of `surgeon`'s model, or None where it does not count two pruned copies
        (about half and about a quarter / three quarters of every group removed) exactly as fvcore does."""
        unpruned = count_cost(surgeon.model, input_size=input_size)
        weights = _weights(surgeon.model, unpruned.by_module)
        positions = {}
        for name, w in weights.items():
            elements = math.prod(w)
            if unpruned.by_module[name] % elements:
                return None  # counted as something other than weight elements × positions
            positions[name] = unpruned.by_module[name] // elements
        half = _probe(surgeon, [c // 2 for c in _channels(surgeon)], weights)
        model = ShapeCost(positions, weights, tuple(_changes(weights, half)))
        other = [c // 4 if g % 2 else 3 * c // 4 for g, c in enumerate(_channels(surgeon))]
        for counts, pruned in ((half.counts, half.model), (other, _probe(surgeon, other, weights).model)):
            if model.flops(counts) != count_cost(pruned, input_size=input_size).flops:
                return None
        return model


@dataclass
class _Probe:
    """A pruned copy, the legal counts removed from each group, and the weight shapes after each group's surgery."""

    model: nn.Module
    counts: list[int]
    after: list[dict[str, Shape]]


def _channels(surgeon: Surgeon) -> list[int]:
    return [g.num_channels for g in surgeon.groups]


def _weights(model: nn.Module, names: Iterable[str]) -> dict[str, Shape]:
    """The weight shape of each layer of `model` named in `names`."""
    modules = dict(model.named_modules())
    return {name: tuple(modules[name].weight.shape) for name in names}


def _probe(surgeon: Surgeon, wanted: Sequence[int], layers: Iterable[str]) -> _Probe:
    """`Surgeon.pruned_copy` with `wanted` channels of each group (made legal counts), the weight
    shapes of `layers` read after each group's surgery."""
    counts = [legal_count(n, g.num_channels, g.blocks) for n, g in zip(wanted, surgeon.groups)]
    after: list[dict[str, Shape]] = []
    model = surgeon.pruned_copy(counts, after_each=lambda m: after.append(_weights(m, list(layers))))
    return _Probe(model, counts, after)


def _changes(unpruned: dict[str, Shape], probe: _Probe) -> list[GroupChange]:
    """Each group's change of the weight shapes: the shapes after its surgery less those before it."""
    changes, before = [], unpruned
    for n, after in zip(probe.counts, probe.after):
        layers = tuple((name, tuple(a - b for a, b in zip(after[name], before[name])))
                       for name in unpruned if after[name] != before[name])
        changes.append(GroupChange(n, layers))
        before = after
    return changes
