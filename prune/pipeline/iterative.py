"""Iterative pruning: the ratio (or a budget's per-layer ratios) reached in S equal steps, as
torch-pruning's linear scheduler does, each step scoring the network the previous one left
(and fine-tuned).

By the end of step s (1-based) group l has lost channels_to_remove(C_l, r_l · s / S) of its
original C_l channels, so the last step ends with the one-step count whatever S. Each step's
decisions index the channels the group had when that step began; `merged` maps them back to
the original channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from prune.pipeline.selection import LayerDecision
from prune.pipeline.surgery import PrunableGroup, channels_to_remove

__all__ = ["merged", "step_counts"]


def step_counts(groups: Sequence[PrunableGroup], original: Sequence[int], ratios: Sequence[float], step: int,
                steps: int, *, rounding: str = "round", round_to: int = 1) -> list[int]:
    """Channels to remove from each group now (as wide as the previous steps left it) so that
    by the end of `step` of `steps` group l has lost its share of r_l = ratios[l] of its
    `original` width (rounded as `channels_to_remove`, aligned to `round_to`)."""
    counts = []
    for group, width, ratio in zip(groups, original, ratios):
        share = ratio if step == steps else ratio * step / steps  # the last step exactly at `ratio`
        total = channels_to_remove(width, share, rule=rounding, blocks=group.blocks, round_to=round_to)
        counts.append(max(0, total - (width - group.num_channels)))
    return counts


def merged(per_step: Sequence[Sequence[LayerDecision]]) -> list[LayerDecision]:
    """One decision per group for the whole run: channels before the first step and after the
    last, removed indices of the original channels, map size, scoring top-1 and scores
    (on the original channels) of the first step."""
    first = per_step[0]
    out = []
    for layer, start in enumerate(first):
        alive = list(range(start.channels_before))  # original index of each channel still there
        for decisions in per_step:
            gone = set(decisions[layer].removed)
            alive = [orig for position, orig in enumerate(alive) if position not in gone]
        removed = tuple(sorted(set(range(start.channels_before)) - set(alive)))
        out.append(replace(start, channels_after=len(alive), removed=removed,
                           scores=torch.as_tensor(start.scores)))
    return out
