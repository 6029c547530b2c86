"""Layer-by-layer channel selection: score each group, remove its lowest-scoring channels.

Scoring streams: one layer at a time, one class at a time, and a class's units go to the
scorer in chunks of images (each forward's largest tensor ≤ `ScoringData.chunk_bytes`), with the
scores of whole classes (`scoring.base`); a scorer with `whole_class` gets each class's units
filled chunk by chunk into one preallocated tensor [N, C, m, m] (no concatenation copy).

Several processes (torchrun) split the *classes* of a layer between them. That is exact
only where a scorer's state is a per-class sum: such scorers implement `state()` (what one
class leaves) and `merge(states)` (the state of all K classes, rebuilt in class order with the
same floating-point operations as one process): entropy, apoz, selectivity, tp-taylor and
tp-hessian. Every other scorer is computed in full on every process (identical results;
weight scorers are cheap).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import scoring
from prune.core import distributed
from prune.core.allocator import release_freed_memory
from prune.outputs.report import LayerResult
from prune.outputs.score_store import NO_STORE, ScoreStore
from prune.pipeline.contract import check_float32_for_scoring
from prune.pipeline.observe import CHUNK_BYTES, collect_units, iter_units
from prune.pipeline.prefix_cache import PREFIX_CACHE_BYTES, PrefixCache, UnitRunner, prefix_cache, tracking
from prune.pipeline.refit import BatchNormRefit, refit_from_cuts
from prune.pipeline.spill import SPILL_BYTES
from prune.pipeline.surgery import PrunableGroup, Surgeon, block_positions, channels_to_remove
from prune.zoo.data import DataBundle, class_images
from scoring.hooks import largest_output
from scoring.model_state import model_device


@dataclass(frozen=True)
class LayerDecision(LayerResult):
    """The report's `LayerResult` of one group plus its `scores` [C] (higher = keep), which
    go to scores.json instead of the report."""

    scores: torch.Tensor

    def result(self) -> LayerResult:
        """The report's record of this decision (every field but `scores`)."""
        return LayerResult(**{f.name: getattr(self, f.name) for f in fields(LayerResult)})


@dataclass(frozen=True)
class ScoringData:
    """Where scoring images come from: K `classes`, `per_class` images each.

    batch_size: most images in one forward pass; chunk_bytes: most bytes in the largest tensor
    of one forward pass (the units, or a larger map before them; at least one image). One
    forward pass is one chunk given to the scorer. prefix: what the network's unchanged prefix
    made of these chunks (`prune.pipeline.prefix_cache`; progressive selection sets it), so a
    chunk's units are computed from there instead of from the images."""

    data: DataBundle
    classes: Sequence[int]
    per_class: int
    seed: int
    batch_size: int = 128
    chunk_bytes: int = CHUNK_BYTES
    prefix: PrefixCache | None = field(default=None, compare=False, repr=False)

    def runner(self, model: nn.Module, name: str, cls: int) -> UnitRunner | None:
        """How chunks of class `cls` at conv `name` get their units from `prefix` (None: a forward)."""
        return None if self.prefix is None else self.prefix.runner(model, name, cls)


def class_batch(model: nn.Module, conv: nn.Conv2d, name: str, source: ScoringData, cls: int) -> scoring.ClassBatch:
    """The ClassBatch of class `cls` at `conv`: its scoring images and all their units."""
    images = class_images(source.data, cls, source.per_class, seed=source.seed)
    units = collect_units(model, conv, images, name=name, batch_size=source.batch_size, chunk_bytes=source.chunk_bytes,
                          run=source.runner(model, name, cls))
    return scoring.ClassBatch(class_index=cls, images=images, activations=units)


def class_chunks(model: nn.Module, conv: nn.Conv2d, name: str, source: ScoringData, cls: int
                 ) -> Iterator[scoring.ClassBatch]:
    """Class `cls` at `conv` as consecutive ClassBatch chunks (images in order), made lazily."""
    images = class_images(source.data, cls, source.per_class, seed=source.seed)
    chunks = iter_units(model, conv, images, name=name, batch_size=source.batch_size, chunk_bytes=source.chunk_bytes,
                        run=source.runner(model, name, cls))
    for where, units in chunks:
        yield scoring.ClassBatch(class_index=cls, images=images[where], activations=units)
        del units  # before the next forward: one chunk's units alive at a time


def update_with_class(scorer: scoring.Scorer, layer: scoring.LayerSpec, source: ScoringData, cls: int, *,
                      overlap: bool | None = None) -> None:
    """Give `scorer` class `cls` at `layer`: chunk by chunk, or whole if it is `whole_class`
    (the images alone, whole, if it does not read units: `reads_units` False).

    overlap (default: the scorer's `reads_only_units`): each chunk's `update` (e.g. its birth
    times) runs on a worker thread while the next chunk's forward runs here; updates stay one at
    a time and in order, so the scores are the same; two chunks' units are alive at once."""
    if not scorer.reads_units:
        images = class_images(source.data, cls, source.per_class, seed=source.seed)
        scorer.update(scoring.ClassBatch(class_index=cls, images=images, activations=images.new_empty(len(images), 0, 0, 0)))
        release_freed_memory()
        return
    if scorer.whole_class:
        scorer.update(class_batch(layer.model, layer.conv, layer.name, source, cls))
        return
    chunks = class_chunks(layer.model, layer.conv, layer.name, source, cls)
    if not (scorer.reads_only_units if overlap is None else overlap):
        for chunk in chunks:
            scorer.update(chunk)
            del chunk  # before the next forward
            release_freed_memory()
        return
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="topoprune-score")
    try:
        pending: Future | None = None
        for chunk in chunks:
            if pending is not None:
                pending.result()  # the previous update, before this one starts
            pending = worker.submit(_update_without_grad, scorer, chunk)
            del chunk
        if pending is not None:
            pending.result()
    except BaseException:
        worker.shutdown(wait=False, cancel_futures=True)  # Ctrl-C or a failure: do not wait for the update
        raise
    worker.shutdown()


def _update_without_grad(scorer: scoring.Scorer, chunk: scoring.ClassBatch) -> None:
    """`scorer.update(chunk)` with autograd off (grad mode is per thread)."""
    with torch.no_grad():
        scorer.update(chunk)
    release_freed_memory()  # the chunk's temporaries: heap holes otherwise kept (prune.core.allocator)


def class_batches(model: nn.Module, conv: nn.Conv2d, name: str, source: ScoringData) -> Iterator[scoring.ClassBatch]:
    """One ClassBatch per class, made lazily (one class's units in memory at a time)."""
    for cls in source.classes:
        yield class_batch(model, conv, name, source, cls)


# ---------------------------------------------------------------- exact class sharding


def class_states(
    scorer: scoring.Scorer, layer: scoring.LayerSpec, source: ScoringData, classes: Sequence[int]
) -> list[tuple[int, Any]]:
    """(class, state) of each class in `classes`, each from a freshly reset scorer."""
    states = []
    for cls in classes:
        scorer.reset(layer)
        update_with_class(scorer, layer, source, cls)
        states.append((cls, scorer.state()))
    return states


def merged_scores(
    scorer: scoring.Scorer, layer: scoring.LayerSpec, states: dict[int, Any], classes: Sequence[int]
) -> torch.Tensor:
    """Scores [C] from per-class states, merged in the order of `classes`."""
    scorer.reset(layer)
    scorer.merge([states[c] for c in classes])
    return scorer.compute()


def _sharded_scores(
    scorer: scoring.Scorer, layer: scoring.LayerSpec, source: ScoringData, world: distributed.World
) -> torch.Tensor:
    """Scores [C] with this rank's classes scored here and the states gathered from all ranks.

    A failure on any rank is raised on every rank, as the same exception (no rank is left waiting).
    """
    gathered = distributed.every_rank(
        lambda: class_states(scorer, layer, source, distributed.shard(source.classes, world)), world)
    states = {cls: state for part in gathered for cls, state in part}
    return merged_scores(scorer, layer, states, source.classes)


def score_group(
    model: nn.Module,
    group: PrunableGroup,
    scorer: scoring.Scorer,
    source: ScoringData | None,
    world: distributed.World = distributed.SINGLE,
    example: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [C] of a group: the mean of its member convs' scores (higher = keep).

    example: an input [1, 3, H, W] of the model, for scorers that trace it (tp-*)."""
    sharded = world.active and scorer.info.needs_data and scorer.shardable()
    member_scores = []
    for name, conv in zip(group.names, group.convs):
        layer = scoring.LayerSpec(model=model, conv=conv, name=name, example=example)
        if sharded:
            scores = _sharded_scores(scorer, layer, source, world)
        else:
            scores = _streamed_scores(scorer, layer, source)
        member_scores.append(scores.float().cpu())
    if not any(group.index_maps):
        return torch.stack(member_scores).mean(dim=0)
    return _mean_on_root(member_scores, group)


def _mean_on_root(member_scores: list[torch.Tensor], group: PrunableGroup) -> torch.Tensor:
    """Scores [C] of the root's channels: each the mean of the member channels that are it
    (`group.index_maps`; a member of other width covers only the root channels it is tied to)."""
    total = torch.zeros(group.num_channels, dtype=torch.float64)
    count = torch.zeros(group.num_channels, dtype=torch.float64)
    for scores, index_map in zip(member_scores, group.index_maps):
        idxs, roots = index_map or (range(len(scores)), range(len(scores)))
        index = torch.as_tensor(list(roots), dtype=torch.long)
        total.index_add_(0, index, scores.double()[list(idxs)])
        count.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    return (total / count.clamp_min(1)).float()


@torch.no_grad()
def _streamed_scores(scorer: scoring.Scorer, layer: scoring.LayerSpec, source: ScoringData | None) -> torch.Tensor:
    """Scores [C]: reset, update class by class in chunks (one chunk's units held at a time;
    one class's for a `whole_class` scorer; the images alone for one that reads no units), compute."""
    scorer.reset(layer)
    if scorer.info.needs_data:
        for cls in source.classes:
            update_with_class(scorer, layer, source, cls)
    return scorer.compute()


SCORING_TOP1_IMAGES = 100
"""How many scoring images measure a layer's `scoring_top1`: the first ⌊100 / K⌋ of each class (at
least one, so K of them when K > 100). A diagnostic, kept to a bounded cost whatever N (VGG16 at
224², K = 10, 13 layers: 1,300 images through the network as each layer leaves it, about 0.8 forwards
of the 1,000 scoring images through the unpruned one, less the prefixes the cache skips)."""


@torch.no_grad()
def scoring_top1(model: nn.Module, source: ScoringData, before: Sequence[str] = ()) -> float:
    """Top-1 in [0, 1] of `model` (eval mode) on the first ⌊SCORING_TOP1_IMAGES / K⌋ (at least one,
    at most N) scoring images of each of the K classes of `source`, labels = their classes.

    With `source.prefix` (progressive selection), each batch runs from what the unchanged prefix
    made of it at the last layer and keeps its values before the convs `before` (the group scored
    next) for the next layer: the same logits, bit for bit, without the prefix's forward."""
    model.eval()
    logits, labels = [], []
    with closing(_scoring_batches(model, source)) as batches:  # its measuring hooks go, also on a failure
        for cls, where, images, sizing in batches:
            run = None if sizing or source.prefix is None else source.prefix.output_runner(model, ("top1", cls), before)
            out = model(images.to(model_device(model))) if run is None else run(where, images)
            logits.append(out.float().cpu())
            labels.append(torch.full((len(images),), cls, dtype=torch.long))
    predicted, truth = torch.cat(logits).argmax(1), torch.cat(labels)
    return int((predicted == truth).sum()) / len(truth)


def _scoring_batches(model: nn.Module, source: ScoringData) -> Iterator[tuple[int, slice, torch.Tensor, bool]]:
    """(class, where, images, sizing) batches, class by class, of the first `SCORING_TOP1_IMAGES` // K
    scoring images of each class (`where`: their positions in the class): the first image alone
    (`sizing`: the caller forwards it through `model`, whose largest tensor is measured), then
    batches of at most `source.batch_size` images and `source.chunk_bytes` in the largest tensor of
    their forward, as the scorers' chunks are bounded."""
    per_class = min(source.per_class, max(1, SCORING_TOP1_IMAGES // len(source.classes)))
    step = None
    for cls in source.classes:
        images = class_images(source.data, cls, source.per_class, seed=source.seed)[:per_class]
        start = 0
        if step is None:
            with largest_output(model) as largest:
                yield cls, slice(0, 1), images[:1], True
            step = max(1, min(source.batch_size, source.chunk_bytes // max(largest[0], 1)))
            start = 1
        for begin in range(start, len(images), step):
            where = slice(begin, min(begin + step, len(images)))
            yield cls, where, images[where], False


def _refit(refit: Callable[[], object], cache: PrefixCache | None, pruned: Sequence[str]) -> None:
    """`refit()` after the surgery of the group `pruned`, inside the cache's tracking: a
    `BatchNormRefit` runs from the cache's cuts (`prune.pipeline.refit`, the same statistics)."""
    if cache is not None and isinstance(refit, BatchNormRefit):
        refit_from_cuts(refit, cache, pruned)
    else:
        refit()


@torch.no_grad()
def map_size(model: nn.Module, conv: nn.Conv2d, example: torch.Tensor, name: str) -> int:
    """Side m of the units [m, m] of `conv` (named `name`) for the model's input `example` [1, 3, s, s]."""
    return int(collect_units(model, conv, example, name=name).shape[-1])


def lowest(scores: torch.Tensor, n: int, *, blocks: int = 1) -> tuple[int, ...]:
    """Indices of the `n` lowest scores (ties broken by lower index), sorted ascending.

    blocks > 1: scores [C] form `blocks` equal blocks that must lose the same offsets (a
    PrunableGroup's grouped conv); the n / blocks offsets with the lowest score averaged over
    the blocks are removed from every block (torch-pruning's rule for channel groups)."""
    if blocks > 1:
        per_offset = scores.reshape(blocks, -1).mean(dim=0)
        return block_positions(len(scores), blocks, lowest(per_offset, n // blocks))
    order = torch.argsort(scores, stable=True)
    return tuple(sorted(int(i) for i in order[:n]))


def layer_ratios(ratio: float | Sequence[float], groups: int) -> tuple[float, ...]:
    """`ratio` as one ratio per group: a float for every group, or a sequence of `groups` ratios in [0, 1)."""
    ratios = (float(ratio),) * groups if isinstance(ratio, numbers.Real) else tuple(float(r) for r in ratio)
    if len(ratios) != groups:
        raise ValueError(f"{len(ratios)} ratios for {groups} prunable groups; pass one ratio or one per group")
    if not all(0.0 <= r < 1.0 for r in ratios):
        raise ValueError(f"every ratio must be in [0, 1), got {ratios}")
    return ratios


def stored_or_scored(
    surgeon: Surgeon, i: int, group: PrunableGroup, scorer: scoring.Scorer, source: ScoringData | None,
    store: ScoreStore = NO_STORE, world: distributed.World = distributed.SINGLE,
) -> torch.Tensor:
    """Scores [C] of group `i` (higher = keep): from `store` if it holds them, else scored now and stored."""
    stored = store.get(i, group)
    if stored is not None:
        return stored
    scores = score_group(surgeon.model, group, scorer, source, world, surgeon.example)
    store.put(i, group, scores)
    return scores


def select_and_prune(
    surgeon: Surgeon,
    scorer: scoring.Scorer,
    source: ScoringData | None,
    *,
    ratio: float | Sequence[float],
    schedule: str = "progressive",
    rounding: str = "round",
    round_to: int = 1,
    counts: Sequence[int] | None = None,
    store: ScoreStore = NO_STORE,
    refit: Callable[[], None] | None = None,
    last_refit_only: bool = False,
    quiet: bool = False,
    world: distributed.World = distributed.SINGLE,
    cache_bytes: int = PREFIX_CACHE_BYTES,
    spill_bytes: int = SPILL_BYTES,
    spill_dir: str | os.PathLike | None = None,
) -> list[LayerDecision]:
    """Prune every group of `surgeon`'s model, shallow → deep: `ratio` of its channels, or
    ratio[l] at group l (one ratio per group, e.g. a budget's allocation).

    progressive: group l is scored on the network already pruned at groups < l (paper A.7.2).
    oneshot: every group is scored on the original network first, then all are pruned.
    `store` may hold layer i's scores from an earlier attempt (resume: `store.get`); scores
    computed here are given to it (`store.put`).
    `refit()`, if given, runs after each group's surgery but the last in the progressive
    schedule (e.g. re-estimating BatchNorm statistics), so the next group is scored on a
    network that fits. (After the last group nothing is scored; in a plain chain its own
    BatchNorm keeps exact statistics for the channels it keeps.) `last_refit_only`: only the last
    of these refits runs, for a weight-only scorer without `source`, where nothing reads the
    network's outputs between surgeries (such a scorer reads parameters, never BatchNorm's
    running statistics); with a `refit()` that depends on the network as it is, not on earlier
    refits (as a reset-and-re-estimate does), the network ends the same (ResNet-50 at 224²: one
    refit instead of 36).
    `round_to` N keeps a multiple of N channels in every pruned group (`channels_to_remove`).
    `counts[l]`, if given, is the number of channels removed at group l instead (a multiple of
    its blocks; an iterative step's share).
    `source` may be None for weight-only scorers. With several processes (`world`), every
    process must call this with the same arguments; each scores its share of the classes
    and all end with the same decisions.
    `cache_bytes`: budget of the progressive schedule's prefix cache (`prune.pipeline.prefix_cache`:
    bit-identical scores, each group's units computed from what the unchanged prefix made of
    each chunk); `spill_bytes`: its disk budget for what does not fit (`prune.pipeline.spill`,
    exact, in a private folder made inside `spill_dir`, default the system's temporary folder,
    and removed before this returns or raises); both 0 score every group by forwards from the images.
    """
    if source is None and scorer.info.needs_data:
        raise ValueError(f"scorer {scorer.info.name!r} needs data: pass a ScoringData source")
    if source is not None:
        check_float32_for_scoring(surgeon.model)
    model = surgeon.model
    model.eval()
    groups = list(surgeon.groups)
    ratios = layer_ratios(ratio, len(groups))
    decisions: list[LayerDecision] = []
    cache = None
    if schedule == "progressive" and source is not None and scorer.info.needs_data and scorer.reads_units:
        cache = prefix_cache(model, budget_bytes=cache_bytes, spill_bytes=spill_bytes, spill_dir=spill_dir)
        source = replace(source, prefix=cache)

    def scores_of(i: int, g: PrunableGroup) -> torch.Tensor:
        return stored_or_scored(surgeon, i, g, scorer, source, store, world)

    def observed(g: PrunableGroup) -> tuple[int, float | None]:
        top1 = None if source is None else scoring_top1(model, source, g.names)
        return map_size(model, g.convs[0], surgeon.example, g.names[0]), top1

    if last_refit_only and source is not None:
        raise ValueError("last_refit_only needs source=None: the scoring images read the network between surgeries")
    refits = range(len(groups) - 2, len(groups) - 1) if last_refit_only else range(len(groups) - 1)
    if schedule == "oneshot":
        state = [observed(g) for g in groups]
        all_scores = [scores_of(i, g) for i, g in enumerate(tqdm(groups, desc="score", disable=quiet))]
    with closing(cache) if cache is not None else nullcontext():  # its spill folder goes, also on a failure
        for i, group in enumerate(tqdm(groups, desc="prune layers", disable=quiet)):
            before = group.num_channels
            if schedule == "oneshot":
                scores, (m, top1) = all_scores[i], state[i]
            else:
                (m, top1), scores = observed(group), scores_of(i, group)
            n = counts[i] if counts is not None else channels_to_remove(before, ratios[i], rule=rounding,
                                                                        blocks=group.blocks, round_to=round_to)
            removed = surgeon.feasible(group, lowest(scores, n, blocks=group.blocks), scores)
            with tracking(cache):  # drops what the surgery and refit change
                surgeon.prune(group, removed)
                if refit is not None and schedule == "progressive" and i in refits:
                    _refit(refit, cache, group.names)
            decisions.append(LayerDecision(
                name=group.name, members=group.names, channels_before=before, channels_after=before - len(removed),
                removed=removed, map_size=m, scoring_top1=top1, scores=scores))
    return decisions
