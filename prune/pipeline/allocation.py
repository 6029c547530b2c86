"""Per-layer pruning ratios that meet a FLOPs target: `uniform`, `global` or `sensitivity`.

Every allocation returns one ratio per prunable group of a `Surgeon`, shallow → deep, each at
most `cap` (`--max-layer-ratio`; at least one channel is always kept). The FLOPs of a candidate
allocation are those `count_cost` counts on a pruned copy of the model (`StructureCost`, which
reads them off the layers' weight shapes where that is exact: `prune.pipeline.shape_cost`): which
channels go does not change the cost, only how many. Where channel rounding makes the target
unreachable exactly, the allocation whose FLOPs fraction is closest to it is chosen.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import torch

from prune.pipeline.counting import count_cost
from prune.pipeline.importance import DEFAULT_NORMALIZE, normalize_scores
from prune.pipeline.shape_cost import ShapeCost
from prune.pipeline.surgery import Surgeon, aligned_removal, channels_to_remove, legal_count

RATIO_GRID = tuple(k / 10 for k in range(1, 10))
"""The ratios at which the sensitivity curves are measured (0.1 … 0.9)."""
BISECTION_STEPS = 40


class StructureCost:
    """FLOPs fraction (pruned / unpruned, by `count_cost`) of `surgeon.model` with n_l output
    channels removed at group l; read off the weight shapes (`ShapeCost`, measured on the first
    question) where they count exactly, else (or with `read_shapes` False) counted on a pruned
    copy; cached by the counts."""

    def __init__(self, surgeon: Surgeon, input_size: int, rounding: str = "round", round_to: int = 1, *,
                 read_shapes: bool = True) -> None:
        self.surgeon = surgeon
        self.input_size = input_size
        self.rounding = rounding
        self.round_to = round_to
        self.channels = tuple(g.num_channels for g in surgeon.groups)
        self.blocks = tuple(g.blocks for g in surgeon.groups)
        self._unpruned = count_cost(surgeon.model, input_size=input_size)
        self.unpruned = self._unpruned.flops
        self._cache: dict[tuple[int, ...], float] = {}
        self._shapes: ShapeCost | None = None
        self._to_measure = read_shapes  # the shape model is measured on the first question

    def counts(self, ratios: Sequence[float]) -> tuple[int, ...]:
        """Channels removed per group at `ratios` (the rounding `select_and_prune` applies)."""
        return tuple(self.counts_of(g, r) for g, r in enumerate(ratios))

    def counts_of(self, group: int, ratio: float) -> int:
        """Channels removed from group `group` at `ratio`."""
        return channels_to_remove(self.channels[group], ratio, rule=self.rounding, blocks=self.blocks[group],
                                  round_to=self.round_to)

    def fraction(self, counts: Sequence[int]) -> float:
        """FLOPs of the structure with `counts` removed (each aligned to `round_to` as
        `select_and_prune` aligns it), as a fraction of the unpruned FLOPs."""
        key = self.aligned(counts)
        if key not in self._cache:
            if self._to_measure:
                self._shapes, self._to_measure = ShapeCost.measure(self.surgeon, self._unpruned), False
            flops = None if self._shapes is None else self._shapes.flops(self._legal(key))
            self._cache[key] = (self._counted(key) if flops is None else flops) / self.unpruned
        return self._cache[key]

    def aligned(self, counts: Sequence[int]) -> tuple[int, ...]:
        """`counts` aligned to `round_to` as `select_and_prune` aligns them."""
        return tuple(aligned_removal(int(n), c, blocks=b, round_to=self.round_to)
                     for n, c, b in zip(counts, self.channels, self.blocks))

    def _legal(self, key: Sequence[int]) -> list[int]:
        """The channels `Surgeon.pruned_copy` removes for `key`."""
        return [legal_count(n, c, b) for n, c, b in zip(key, self.channels, self.blocks)]

    def _counted(self, key: Sequence[int]) -> int:
        """FLOPs of a pruned copy with `key` removed, by `count_cost`."""
        return count_cost(self.surgeon.pruned_copy(key), input_size=self.input_size).flops

    def confirmed(self, ratios: Sequence[float]) -> bool:
        """Whether the fraction given for `ratios` is the one a pruned copy counts. If not, every
        later fraction is counted on copies (and False says the plan needs making again)."""
        key = self.aligned(self.counts(ratios))
        given = self.fraction(key)
        if self._shapes is None or self._counted(key) / self.unpruned == given:
            return True
        self._shapes, self._cache = None, {}
        return False

    def fraction_at(self, ratios: Sequence[float]) -> float:
        """`fraction` of the structure that `ratios` give."""
        return self.fraction(self.counts(ratios))


def closest(fraction_of: Callable[[float], float], lo: float, hi: float, target: float) -> float:
    """The x in [lo, hi] whose `fraction_of(x)` (non-increasing in x) is closest to `target`,
    by bisection; ties go to the smaller x (less pruning)."""
    best = min((abs(fraction_of(x) - target), x) for x in (lo, hi))
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        f = fraction_of(mid)
        best = min(best, (abs(f - target), mid))
        if f > target:
            lo = mid
        else:
            hi = mid
    return best[1]


def uniform(cost: StructureCost, target: float, cap: float) -> tuple[float, ...]:
    """One ratio r in [0, cap] for every group: the one whose FLOPs fraction is closest to `target`.

    With `round_to` > 1 every group's width moves in multiples that jump together as r grows, so
    the groups are then `nudged` one multiple at a time towards the target."""
    r = closest(lambda x: cost.fraction_at([x] * len(cost.channels)), 0.0, cap, target)
    if cost.round_to == 1:
        return (r,) * len(cost.channels)
    return nudged(cost, cost.counts([r] * len(cost.channels)), target, cap)


def aligned_widths(channels: int, unit: int, cap: float) -> list[int]:
    """The widths a group of `channels` may keep when aligned to `unit` (multiples of it, and
    `channels` itself), losing at most `most_removable(channels, cap)`; ascending."""
    least = channels - most_removable(channels, cap)
    return sorted({k for k in range(unit, channels + 1, unit) if k >= least} | {channels})


def within_cap(cost: StructureCost, counts: Sequence[int], cap: float) -> list[int]:
    """Aligned `counts` with each group that loses more than `cap` allows moved up to the narrowest
    aligned width the cap allows (`aligned_widths`); the counts themselves when `round_to` is 1."""
    if cost.round_to == 1:
        return list(counts)
    return _capped_counts(counts, cost.channels, group_widths(cost, cap))


def group_widths(cost: StructureCost, cap: float) -> list[list[int]]:
    """`aligned_widths` of every group of `cost` (ascending), at `cap`."""
    return [aligned_widths(c, math.lcm(cost.round_to, b), cap) for c, b in zip(cost.channels, cost.blocks)]


def _capped_counts(counts: Sequence[int], channels: Sequence[int], widths: Sequence[Sequence[int]]) -> list[int]:
    """Each count moved to keep the narrowest allowed width at least as wide as it would keep."""
    return [c - min(w for w in ws if w >= c - n) for n, c, ws in zip(counts, channels, widths)]


def capped(cost: StructureCost, ratios: Sequence[float], cap: float) -> tuple[float, ...]:
    """`ratios` as the aligned counts `within_cap` gives them (`ratios` when `round_to` is 1)."""
    if cost.round_to == 1:
        return tuple(ratios)
    return tuple(n / c for n, c in zip(within_cap(cost, cost.counts(ratios), cap), cost.channels))


def neighbours(widths: Sequence[int], width: int) -> list[int]:
    """The widths just below and just above `width` in the ascending `widths` (none if it is not one)."""
    if width not in widths:
        return []
    i = list(widths).index(width)
    return [*widths[max(0, i - 1):i], *widths[i + 1:i + 2]]


def nudged(cost: StructureCost, counts: Sequence[int], target: float, cap: float) -> tuple[float, ...]:
    """Ratios n_l / C_l after moving single groups to a neighbouring aligned width
    (`aligned_widths`), each time the move that brings the FLOPs fraction closest to `target`,
    while one brings it closer. A group whose aligned count passes `cap` starts at the narrowest
    aligned width the cap allows."""
    widths = group_widths(cost, cap)
    narrowest = [c - ws[0] for c, ws in zip(cost.channels, widths)]
    if cost.fraction(narrowest) >= target:  # every narrower move brings it closer: the greedy walk ends there
        return tuple(n / c for n, c in zip(narrowest, cost.channels))
    counts = _capped_counts(counts, cost.channels, widths)
    best = abs(cost.fraction(counts) - target)
    while True:
        moves = []
        for g, (n, c) in enumerate(zip(counts, cost.channels)):
            for width in neighbours(widths[g], c - n):
                trial = [*counts[:g], c - width, *counts[g + 1:]]
                moves.append((abs(cost.fraction(trial) - target), g, c - width))
        if not moves or min(moves)[0] >= best:
            return tuple(n / c for n, c in zip(counts, cost.channels))
        best, g, counts[g] = min(moves)


def most_removable(channels: int, cap: float) -> int:
    """The most channels a group of `channels` may lose at `cap` (at least one is kept)."""
    return max(0, min(math.floor(cap * channels + 1e-9), channels - 1))


def removal_order(scores: Sequence[torch.Tensor], cap: float) -> list[int]:
    """Group index of each removable channel, lowest normalised score first across groups.

    scores[l]: [C_l], higher = keep; each group's scores are normalised as `as_tp_importance`
    normalises them (`normalize_scores`, DEFAULT_NORMALIZE) so that groups compare; a group
    offers only its `most_removable` lowest channels. Ties: shallower group, then lower rank.
    """
    entries = []
    for group, s in enumerate(scores):
        z = normalize_scores(s, DEFAULT_NORMALIZE)
        ranked = torch.sort(z, stable=True).values[: most_removable(len(s), cap)]
        entries.append([(float(v), group, rank) for rank, v in enumerate(ranked)])
    return [group for _, group, _ in heapq.merge(*entries)]


def global_ranking(cost: StructureCost, scores: Sequence[torch.Tensor], target: float, cap: float) -> tuple[float, ...]:
    """Ratios n_l / C_l where the k globally lowest channels (`removal_order`) are removed, k
    chosen by bisection so that the FLOPs fraction is closest to `target`.

    With `round_to` > 1 each group's count is aligned, which moves the FLOPs off the target by up
    to a multiple per group (far, where grouped convolutions make the multiples wide): the aligned
    counts are then `nudged` one multiple at a time towards the target, as `uniform`'s are."""
    order = removal_order(scores, cap)

    def counts(k: float) -> list[int]:
        n = [0] * len(cost.channels)
        for group in order[: round(k)]:
            n[group] += 1
        return n

    k = round(closest(lambda x: cost.fraction(counts(x)), 0.0, float(len(order)), target))
    if cost.round_to > 1:
        return nudged(cost, cost.aligned(counts(k)), target, cap)
    return tuple(n / c for n, c in zip(counts(k), cost.channels))


def least_loss(cost: StructureCost, increase: Sequence[Sequence[float]], target: float, cap: float,
               grid: Sequence[float] = RATIO_GRID) -> tuple[float, ...]:
    """Per-group ratios that meet `target` with the least summed loss increase, greedily.

    increase[l][j]: loss increase when only group l is pruned at grid[j]. From no pruning, the
    step (one group to its next grid ratio up to `cap` that removes more channels: on a narrow
    group neighbouring ratios can round to the same count) with the least loss increase per FLOPs
    fraction saved is taken until the target is met; the last step is then shortened (by
    bisection on that group's ratio) to the ratio whose FLOPs fraction is closest to `target`.
    """
    ratios = [0.0, *(r for r in grid if r <= cap + 1e-9)]
    curves = [[0.0, *row[: len(ratios) - 1]] for row in increase]
    step = [0] * len(cost.channels)

    def at(steps: Sequence[int]) -> list[float]:
        return [ratios[j] for j in steps]

    def next_step(g: int, j: int) -> int | None:
        """The first grid index after j at which group g loses more channels (None: none up to the cap)."""
        removed = cost.counts_of(g, ratios[j])
        return next((k for k in range(j + 1, len(ratios)) if cost.counts_of(g, ratios[k]) > removed), None)

    last = None  # (group, grid index before its last step)
    while cost.fraction_at(at(step)) > target:
        now, options = cost.fraction_at(at(step)), []
        for g, j in enumerate(step):
            k = next_step(g, j)
            if k is not None:
                saved = now - cost.fraction_at(at([*step[:g], k, *step[g + 1:]]))
                if saved > 0:
                    options.append(((curves[g][k] - curves[g][j]) / saved, g, k))
        if not options:
            break  # no group can lose another channel: the closest reachable
        _, g, k = min(options)
        last, step[g] = (g, step[g]), k
    chosen = at(step)
    if last is not None:
        g, before = last
        lo, hi = ratios[before], ratios[step[g]]
        chosen[g] = closest(lambda x: cost.fraction_at([*chosen[:g], x, *chosen[g + 1:]]), lo, hi, target)
    return tuple(chosen)
