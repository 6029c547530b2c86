"""FLOPs of a pruned structure read off its layers' weight shapes, without pruning a copy for it.

fvcore counts a convolution or linear layer as (its weight's elements) × (the positions it is
applied at: output pixels, input pixels for a transposed convolution, rows for a linear layer), and
removing channels changes the weights' shapes, never the positions. Where every layer a group
touches matches its root channel for channel (or a fixed number of its features per channel, as a
flattened head does), removing n of the group's channels changes each weight shape by n / n₀ times
what removing n₀ of them did, and the changes of different groups add up.

`ShapeCost.measure` reads each group's change off a pruned copy with all but one channel per block
of every group removed, and keeps a group only where a second copy with one block's worth removed
changes every shape in the same proportion and the group has no member narrower than its root
(there `Surgeon.feasible` may keep channels back, and which members lose channels depends on how
many go). fvcore must count every layer of both copies at the unpruned model's positions (not so
where the forward reads the width, e.g. runs a layer once more when narrower: then no model, nor
where a copy cannot be pruned or run), and the kept groups are checked together on a third copy.
Checks at three widths cannot rule out a forward that reads the width only between them: such a
miscount can steer the search, but the FLOPs a plan reports are always counted on a copy. A structure that
prunes a group not kept is counted on a copy (`flops` says None). A budget's search thus asks
thousands of structures at the price of arithmetic (`prune.pipeline.allocation.StructureCost`),
and the plan it settles on is counted on a copy once more (`StructureCost.confirmed`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from prune.errors import out_of_memory
from prune.pipeline.counting import ModelCost, count_cost
from prune.pipeline.surgery import PrunableGroup, Surgeon, legal_count

Shape = tuple[int, ...]
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupChange:
    """What removing `probe` channels of one group did: the change of each layer's weight shape it
    touched. `probe` 0: the group is not modelled (a structure that prunes it is counted on a copy)."""

    probe: int
    layers: tuple[tuple[str, Shape], ...]


NOT_MODELLED = GroupChange(0, ())


@dataclass(frozen=True)
class ShapeCost:
    """positions[name]: where the counted layer `name` is applied (its MACs per weight element);
    shapes[name]: its unpruned weight shape; changes[g]: group g's `GroupChange`."""

    positions: dict[str, int]
    shapes: dict[str, Shape]
    changes: tuple[GroupChange, ...]

    def flops(self, removed: Sequence[int]) -> int | None:
        """FLOPs (2 × MACs) with `removed[g]` output channels of group g gone (legal counts, as
        `Surgeon.pruned_copy` removes them); None where a pruned group is not modelled."""
        shapes = {name: list(shape) for name, shape in self.shapes.items()}
        for change, n in zip(self.changes, removed):
            if n == 0:
                continue
            if change.probe == 0:
                return None
            for name, delta in change.layers:
                for dim, d in enumerate(delta):
                    step, rest = divmod(d * n, change.probe)
                    if rest:
                        return None
                    shapes[name][dim] += step
        return 2 * sum(self.positions[name] * math.prod(shape) for name, shape in shapes.items())

    @classmethod
    def measure(cls, surgeon: Surgeon, unpruned: ModelCost) -> ShapeCost | None:
        """The shape model of `surgeon`'s model (`unpruned`: its `count_cost`), or None where fvcore
        does not count every layer of the unpruned model and of both probes as weight elements ×
        positions (the same positions), where a probe cannot be pruned or run, or where the modelled
        groups miscount a third copy."""
        shapes = _weights(surgeon.model, unpruned.by_module)
        positions = {}
        for name, shape in shapes.items():
            if unpruned.by_module[name] % math.prod(shape):
                return None  # counted as something other than weight elements × positions
            positions[name] = unpruned.by_module[name] // math.prod(shape)
        try:  # beyond --max-layer-ratio, torch-pruning may refuse a probe or the copy not run: then copies
            return _checked(surgeon, unpruned.input_size, positions, shapes)
        except Exception as exc:  # whatever torch-pruning or the model's forward raises
            if out_of_memory(exc):
                raise
            _log.info("candidate FLOPs are counted on pruned copies: a probe failed (%s: %s)", type(exc).__name__, exc)
            return None


def _checked(surgeon: Surgeon, input_size: int, positions: dict[str, int],
             shapes: dict[str, Shape]) -> ShapeCost | None:
    """`ShapeCost.measure`'s model from its probes, None where a check fails."""
    groups = surgeon.groups
    probes = [_probe(surgeon, [g.num_channels - g.blocks for g in groups], shapes, input_size),
              _probe(surgeon, [g.blocks for g in groups], shapes, input_size)]
    if any(probe.counted != {name: positions[name] * math.prod(probe.shapes()[name]) for name in shapes}
           for probe in probes):
        return None  # a layer applied at other positions once narrower (a forward that reads the width)
    most, least = (_changes(shapes, probe) for probe in probes)
    model = ShapeCost(positions, shapes, tuple(_kept(g, a, b) for g, a, b in zip(groups, most, least)))
    half = [legal_count(g.num_channels // 2, g.num_channels, g.blocks) if c.probe else 0
            for g, c in zip(groups, model.changes)]
    return model if model.flops(half) == count_cost(surgeon.pruned_copy(half), input_size=input_size).flops else None


@dataclass(frozen=True)
class _Probe:
    """The legal counts removed from each group of a pruned copy, its weight shapes after each
    group's surgery (`unpruned` before any), and fvcore's MACs of each counted layer of the copy."""

    counts: list[int]
    after: list[dict[str, Shape]]
    unpruned: dict[str, Shape]
    counted: dict[str, int]

    def shapes(self) -> dict[str, Shape]:
        """The copy's weight shapes."""
        return self.after[-1] if self.after else self.unpruned


def _weights(model: nn.Module, names: Iterable[str]) -> dict[str, Shape]:
    """The weight shape of each layer of `model` named in `names`."""
    modules = dict(model.named_modules())
    return {name: tuple(modules[name].weight.shape) for name in names}


def _probe(surgeon: Surgeon, wanted: Sequence[int], unpruned: dict[str, Shape], input_size: int) -> _Probe:
    """`Surgeon.pruned_copy` with `wanted` channels of each group (made legal counts), the weight
    shapes of the layers of `unpruned` read after each group's surgery, and the copy counted."""
    counts = [legal_count(n, g.num_channels, g.blocks) for n, g in zip(wanted, surgeon.groups)]
    after: list[dict[str, Shape]] = []
    copy = surgeon.pruned_copy(counts, after_each=lambda m: after.append(_weights(m, unpruned)))
    return _Probe(counts, after, unpruned, count_cost(copy, input_size=input_size).by_module)


def _changes(unpruned: dict[str, Shape], probe: _Probe) -> list[GroupChange]:
    """Each group's change of the weight shapes: the shapes after its surgery less those before it."""
    changes, before = [], unpruned
    for n, after in zip(probe.counts, probe.after):
        layers = tuple((name, tuple(a - b for a, b in zip(after[name], before[name])))
                       for name in unpruned if after[name] != before[name])
        changes.append(GroupChange(n, layers))
        before = after
    return changes


def _kept(group: PrunableGroup, most: GroupChange, least: GroupChange) -> GroupChange:
    """`most` where the group has no narrower member and `least` changed every shape in proportion,
    else NOT_MODELLED."""
    if any(group.index_maps) or 0 in (most.probe, least.probe) or [n for n, _ in most.layers] != [
            n for n, _ in least.layers]:
        return NOT_MODELLED
    proportional = all(a * least.probe == b * most.probe
                       for (_, da), (_, db) in zip(most.layers, least.layers) for a, b in zip(da, db))
    return most if proportional else NOT_MODELLED
