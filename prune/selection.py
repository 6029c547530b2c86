"""Layer-by-layer channel selection: score each group, remove its lowest-scoring channels."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import scoring
from prune.data import DataBundle, class_images
from prune.observe import collect_units
from prune.surgery import PrunableGroup, Surgeon, channels_to_remove


@dataclass(frozen=True)
class LayerDecision:
    """What happened at one group: `scores` [C] (higher = keep) and the `removed` indices."""

    name: str
    members: tuple[str, ...]
    channels_before: int
    scores: torch.Tensor
    removed: tuple[int, ...]

    @property
    def channels_after(self) -> int:
        return self.channels_before - len(self.removed)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "members": list(self.members),
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "removed": list(self.removed),
        }


@dataclass(frozen=True)
class ScoringData:
    """Where scoring images come from: K `classes`, `per_class` images each."""

    data: DataBundle
    classes: Sequence[int]
    per_class: int
    seed: int
    batch_size: int = 128


def class_batches(model: nn.Module, conv: nn.Conv2d, name: str, source: ScoringData) -> Iterator[scoring.ClassBatch]:
    """One ClassBatch per class, made lazily (one class's units in memory at a time)."""
    for cls in source.classes:
        images = class_images(source.data, cls, source.per_class, seed=source.seed)
        units = collect_units(model, conv, images, name=name, batch_size=source.batch_size)
        yield scoring.ClassBatch(class_index=cls, images=images, activations=units)


def score_group(model: nn.Module, group: PrunableGroup, scorer: scoring.Scorer, source: ScoringData) -> torch.Tensor:
    """Scores [C] of a group: the mean of its member convs' scores (higher = keep)."""
    member_scores = []
    for name, conv in zip(group.names, group.convs):
        layer = scoring.LayerSpec(model=model, conv=conv, name=name)
        batches = class_batches(model, conv, name, source) if scorer.info.needs_data else ()
        member_scores.append(scorer(layer, batches).float().cpu())
    return torch.stack(member_scores).mean(dim=0)


def lowest(scores: torch.Tensor, n: int) -> tuple[int, ...]:
    """Indices of the `n` lowest scores (ties broken by lower index), sorted ascending."""
    order = torch.argsort(scores, stable=True)
    return tuple(sorted(int(i) for i in order[:n]))


ScoreCache = Callable[[int, PrunableGroup, Callable[[], torch.Tensor]], torch.Tensor]


def _no_cache(_i: int, _g: PrunableGroup, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return compute()


def select_and_prune(
    surgeon: Surgeon,
    scorer: scoring.Scorer,
    source: ScoringData | None,
    *,
    ratio: float,
    schedule: str = "progressive",
    rounding: str = "round",
    cache: ScoreCache = _no_cache,
    quiet: bool = False,
) -> list[LayerDecision]:
    """Prune every group of `surgeon`'s model, shallow → deep.

    progressive: group l is scored on the network already pruned at groups < l (paper A.7.2).
    oneshot: every group is scored on the original network first, then all are pruned.
    `cache(i, group, compute)` may return stored scores instead of computing them (resume).
    `source` may be None for weight-only scorers.
    """
    if source is None and scorer.info.needs_data:
        raise ValueError(f"scorer {scorer.info.name!r} needs data: pass a ScoringData source")
    model = surgeon.model
    model.eval()
    groups = list(surgeon.groups)
    decisions: list[LayerDecision] = []
    if schedule == "oneshot":
        all_scores = [
            cache(i, g, lambda g=g: score_group(model, g, scorer, source))
            for i, g in enumerate(tqdm(groups, desc="score", disable=quiet))
        ]
    for i, group in enumerate(tqdm(groups, desc="prune layers", disable=quiet)):
        before = group.num_channels
        if schedule == "oneshot":
            scores = all_scores[i]
        else:
            scores = cache(i, group, lambda: score_group(model, group, scorer, source))
        removed = lowest(scores, channels_to_remove(before, ratio, rule=rounding))
        surgeon.prune(group, removed)
        decisions.append(LayerDecision(group.name, group.names, before, scores, removed))
    return decisions
