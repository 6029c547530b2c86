"""Channel surgery. The only module that touches torch-pruning's DependencyGraph.

A `PrunableGroup` is a set of conv layers whose output channels must be removed together
(one conv in a plain net; every conv feeding one residual addition in a ResNet). Groups come
in depth order (forward-execution order of their first conv), which torch-pruning itself
does not guarantee.

Grouped convolutions and GroupNorm split a group's channels into `blocks` equal consecutive
blocks that must stay equal (torch-pruning's channel groups): the same positions are removed
from every block (`block_positions`), as torch-pruning's own pruners do, so every grouped
conv keeps whole groups. A group whose blocks have one channel each (a conv feeding a grouped
conv with one input channel per group) or whose blocks a concatenation misaligns is not
prunable and is left out, as is a root torch-pruning cannot group within `INDEX_LIMIT` indices
(channels flattened with positions again and again), whose walk cycles without end (`_bounded_flatten`)
or that it cannot group at all (an op its index mappings fail on),
a root whose channels torch-pruning ties to each other (a chunk of its output gating another: it
would remove more than the selection chose), and a group after whose surgery the model no longer runs (tried
once on a copy, `Surgeon._working`: torch-pruning cannot rewrite a `split` by constant sizes
or a partial residual such as `x[:, :c] += shortcut` in a model's forward). A member conv may
have fewer or more channels than the root (concatenations, slices): `PrunableGroup.index_maps`
says which root channel each of its channels is. Depthwise convs are never roots: their channels follow the conv that feeds them.
"""

from __future__ import annotations

import copy
import gc
import math
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from prune.errors import UsageError, first_line, out_of_memory
from prune.pipeline.contract import check_not_compiled
from scoring.dependency import dependency_graph
from scoring.hooks import classifier_convs, execution_order, is_depthwise, may_prune
from scoring.model_state import eval_mode

INDEX_LIMIT = 1 << 22
"""torch-pruning carries a group's channel indices through every reshape it meets, one index per
flattened element; where channels are flattened with positions again and again (a window-attention
transformer such as Swin V2) the lists grow without bound. A root one of whose flattens would make
more indices than this (4,194,304: a plain CNN flattening a 64 × 256 × 256 map into a Linear still
fits) is left out (`_bounded_flatten`), before the lists fill the memory (~100 bytes an index)."""

_FLATTEN_PATCH = threading.Lock()
"""`_bounded_flatten` patches a torch-pruning class for the whole process: one thread at a time."""

IndexMap = tuple[tuple[int, ...], tuple[int, ...]]
"""(member channels, the root channel of each): how a member conv's channels match the root's."""


class _IndexBlowUp(RuntimeError):
    """torch-pruning's index lists for a group passed INDEX_LIMIT."""


@contextmanager
def _bounded_flatten(nodes: int) -> Iterator[None]:
    """While open, torch-pruning's flatten index mapping raises `_IndexBlowUp` instead of making
    more than INDEX_LIMIT indices (it makes len(idxs) × stride of them at once), or once it has been
    called more than 2 × `nodes` + 16 times (`nodes`: the dependency graph's): torch-pruning's walk of
    a group can cycle through reshapes without end (an einsum over channels and positions, as an
    attention pooling's), while a walk that ends calls it a few times (torchvision's most: 10 calls in
    AlexNet's graph of 23 nodes, whose walk bounces between the ops around its flatten)."""
    mapping = tp.dependency.index_mapping._FlattenIndexMapping
    calls = [0]

    def bounded(self, idxs):  # noqa: ANN001, ANN202 (torch-pruning's signature)
        if not self.reverse and len(idxs) * self._stride > INDEX_LIMIT:
            raise _IndexBlowUp(f"a flatten would make torch-pruning carry more than {INDEX_LIMIT:,} channel indices "
                               "(channels flattened with positions, again and again in a window-attention transformer)")
        calls[0] += 1
        if calls[0] > 2 * nodes + 16:
            raise _IndexBlowUp(f"torch-pruning's walk of its channels passed a reshape {calls[0]} times in a graph of "
                               f"{nodes} nodes: it cycles without end (channels mixed with positions, e.g. by an "
                               "einsum or a matmul)")
        return original(self, idxs)

    with _FLATTEN_PATCH:
        original = mapping.__call__
        mapping.__call__ = bounded
        try:
            yield
        finally:
            mapping.__call__ = original


class GroupsLeftOut(UserWarning):
    """Conv groups whose surgery would stop the model running are left unpruned."""


@dataclass(frozen=True)
class PrunableGroup:
    """Convs tied by a dependency; `names[0]`/`convs[0]` is the shallowest (the root).

    blocks: the root's C channels form this many equal consecutive blocks that must keep equal
    sizes (a grouped conv's or a GroupNorm's groups; 1: none). index_maps: per member, None when
    its channel i is the root's channel i for every i (same width), else its `IndexMap`."""

    names: tuple[str, ...]
    convs: tuple[nn.Conv2d, ...]
    blocks: int = 1
    index_maps: tuple[IndexMap | None, ...] = ()

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def num_channels(self) -> int:
        return int(self.convs[0].out_channels)


def channels_to_remove(num_channels: int, ratio: float, *, rule: str = "round", blocks: int = 1,
                       round_to: int = 1) -> int:
    """How many of `num_channels` to remove at `ratio` (at least one channel is kept).

    rule "round": round(ratio·C) (the default). rule "floor-keep": keep ⌊(1−ratio)·C⌋, the
    rounding that reproduces the paper's Table 12 counts. With `blocks` > 1 (see PrunableGroup)
    the count is `blocks` times the count of one block: the same number leaves every block.
    With `round_to` N > 1 (torch-pruning's `round_to`) the channels kept are then moved to the
    nearest multiple of lcm(N, blocks) (torch-pruning rounds up; the nearest stays closer to
    `ratio`), at least one such multiple and never more than C; a layer the ratio leaves
    whole, or narrower than that multiple, keeps all its channels.
    """
    if blocks > 1:
        n = blocks * channels_to_remove(num_channels // blocks, ratio, rule=rule)
    elif rule == "round":
        n = round(ratio * num_channels)
    elif rule == "floor-keep":
        n = num_channels - math.floor((1.0 - ratio) * num_channels + 1e-9)
    else:
        raise UsageError(f"unknown rounding rule {rule!r}; use 'round' or 'floor-keep'")
    return aligned_removal(max(0, min(n, num_channels - 1)), num_channels, blocks=blocks, round_to=round_to)


def aligned_removal(n: int, num_channels: int, *, blocks: int = 1, round_to: int = 1) -> int:
    """`n` channels to remove changed so that the channels kept are a multiple of
    unit = lcm(round_to, blocks): the nearest (halves up), at least one unit, at most C; `n`
    itself when round_to is 1, 0 when n is 0 or the layer is narrower than one unit."""
    unit = math.lcm(round_to, blocks)
    if round_to == 1 or n == 0 or num_channels < unit:
        return n if round_to == 1 else 0
    nearest = math.floor((num_channels - n) / unit + 0.5) * unit
    return num_channels - min(max(unit, nearest), num_channels // unit * unit)


def legal_count(n: int, num_channels: int, blocks: int) -> int:
    """`n` channels to remove rounded to the nearest multiple of `blocks` that keeps at least
    one channel per block (n itself when blocks is 1)."""
    if blocks == 1:
        return n
    size = num_channels // blocks
    return max(0, min(round(n / blocks), size - 1)) * blocks


def block_positions(num_channels: int, blocks: int, offsets: Sequence[int]) -> tuple[int, ...]:
    """Channel indices at `offsets` within each of the `blocks` equal blocks of `num_channels`, sorted."""
    size = num_channels // blocks
    return tuple(sorted(b * size + int(i) for b in range(blocks) for i in offsets))


def _same_in_every_block(idxs: Sequence[int], num_channels: int, blocks: int) -> bool:
    """Whether `idxs` remove the same offsets from each of the `blocks` equal blocks of `num_channels`."""
    if num_channels % blocks:
        return False
    size = num_channels // blocks
    per_block = [sorted(i % size for i in idxs if i // size == b) for b in range(blocks)]
    return all(p == per_block[0] for p in per_block)


def _channel_groups(m: nn.Module) -> int:
    """The equal channel blocks `m` needs kept equal: a grouped (not depthwise) conv's groups, a GroupNorm's groups."""
    if isinstance(m, nn.Conv2d) and not is_depthwise(m):
        return int(m.groups)
    if isinstance(m, nn.GroupNorm):
        return int(m.num_groups)
    return 1


class Surgeon:
    """Owns the dependency graph of `model` and removes output channels of conv groups
    (roots: the convs a forward runs that `may_prune` accepts, not in `ignored_layers`; a root
    torch-pruning cannot group or prune and keep the model running is left out, with a warning)."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        *,
        ignored_layers: Sequence[nn.Module] = (),
        verify: bool = True,
        groups: Sequence[PrunableGroup] | None = None,
    ) -> None:
        """`verify`: leave out the groups whose surgery stops the model running (`_working`).
        `groups`: this model's groups as already found (a copy's), instead of finding them."""
        check_not_compiled(model)
        self.model = model
        self.example = example_inputs
        self._names = {m: n for n, m in model.named_modules()}
        self._ignored = list(ignored_layers)
        broken: list[str] = []
        with eval_mode(model):  # the analysis's forwards leave BatchNorm statistics and modes as they were
            self._classifiers = classifier_convs(model, example_inputs)  # its input channels still follow pruning
            self.graph = _dependency_graph(model, example_inputs, self._ignored)
            self.groups = list(groups) if groups is not None else self._find_groups(
                execution_order(model, example_inputs), broken)
            if verify:
                self.groups, unrunnable = self._working(self.groups)
                broken += unrunnable
        if broken and self.groups:
            warnings.warn(f"left unpruned: {len(broken)} conv group(s) torch-pruning cannot prune and keep the model "
                          f"running: {'; '.join(broken[:3])}{'; …' if len(broken) > 3 else ''}", GroupsLeftOut,
                          stacklevel=2)
        if not self.groups and broken:
            raise UsageError(
                f"none of the model's {len(broken)} conv group(s) can be pruned: torch-pruning cannot remove their "
                f"channels and keep the model running (first: {broken[0]}); it cannot rewrite such a forward (e.g. a "
                "transformer's patch embedding feeding attention, a conv with parameters of its own, a split by "
                "constant sizes); choose a CNN such as resnet50 or convnext_tiny")
        if not self.groups:
            raise UsageError(
                "the model has no prunable conv layer (needs an nn.Conv2d that is not depthwise, with at least "
                "two channels per group); choose a CNN such as vgg16 or resnet34"
            )

    def _is_root_candidate(self, m: nn.Module) -> bool:
        return may_prune(m, self._classifiers) and m not in self._ignored

    def _find_groups(self, order: list[nn.Module], left_out: list[str]) -> list[PrunableGroup]:
        """The prunable groups, roots in execution `order`; a root torch-pruning cannot group (within
        INDEX_LIMIT indices, in a walk that ends, or at all: a recurrent layer fed a permuted map) or
        whose channels it ties to each other is left out and named in `left_out` ("name (reason)")."""
        depth = {m: i for i, m in enumerate(order)}
        seen: set[nn.Module] = set()
        groups: list[PrunableGroup] = []
        for conv in order:
            if conv in seen or not self._is_root_candidate(conv):
                continue
            try:
                with _bounded_flatten(len(self.graph.module2node)):
                    full = self._group(conv, range(conv.out_channels))
                with _bounded_flatten(len(self.graph.module2node)):
                    tied = self._ties_own_channels(conv)
            except _IndexBlowUp as exc:
                left_out.append(f"{self._names[conv]} ({exc})")
                continue
            except (IndexError, KeyError) as exc:  # its index mappings fail on ops they do not know
                left_out.append(f"{self._names[conv]} (torch-pruning cannot follow its channels: "
                                f"{type(exc).__name__}: {first_line(exc)})")
                continue
            maps = self._member_maps(full, conv.out_channels)
            seen.update(maps)
            blocks = math.lcm(*(_channel_groups(item.dep.target.module) for item in full))
            if not self._blocks_prunable(conv, blocks):
                continue
            if tied:
                left_out.append(f"{self._names[conv]} (torch-pruning ties its channels to each other: a chunk of "
                                "its output combined with another, as a gated unit's a * sigmoid(b))")
                continue
            members = sorted(maps, key=lambda m: depth.get(m, len(depth)))
            groups.append(PrunableGroup(
                names=tuple(self._names[m] for m in members), convs=tuple(members), blocks=blocks,
                index_maps=tuple(_index_map(m, maps[m], conv.out_channels) for m in members)))
        return groups

    def _member_maps(self, group: tp.dependency.Group, root_channels: int) -> dict[nn.Conv2d, IndexMap]:
        """The convs (not depthwise) whose output channels `group` removes, each with its IndexMap
        (only pairs of a channel the member has and a root channel: torch-pruning's maps through
        slices can hold others)."""
        maps: dict[nn.Conv2d, IndexMap] = {}
        for item in group:
            m = item.dep.target.module
            if isinstance(m, nn.Conv2d) and not is_depthwise(m) and self.graph.is_out_channel_pruning_fn(item.dep.handler):
                pairs = sorted({(int(i), int(r)) for i, r in zip(item.idxs, item.root_idxs)
                                if r is not None and 0 <= int(r) < root_channels and 0 <= int(i) < m.out_channels})
                maps[m] = (tuple(i for i, _ in pairs), tuple(r for _, r in pairs))
        return maps

    def _blocks_prunable(self, root: nn.Conv2d, blocks: int) -> bool:
        """Whether removing the same offsets from every one of `blocks` blocks of `root`'s channels
        keeps every grouped member of its group valid (each block keeps a channel; no concatenation
        shifts the blocks out of line)."""
        if blocks == 1:
            return True
        channels = root.out_channels
        if channels % blocks or channels // blocks < 2:
            return False
        for item in self._group(root, block_positions(channels, blocks, [0])):
            m, groups = item.dep.target.module, _channel_groups(item.dep.target.module)
            if groups > 1:
                pruner = self.graph.get_pruner_of_module(m)
                out = self.graph.is_out_channel_pruning_fn(item.dep.handler)
                width = pruner.get_out_channels(m) if out else pruner.get_in_channels(m)
                if not _same_in_every_block(item.idxs, width, groups):
                    return False
        return True

    def _ties_own_channels(self, conv: nn.Conv2d) -> bool:
        """Whether removing some of `conv`'s channels makes torch-pruning remove others of its own too
        (which the selection's counts would not foresee): probed with a seeded random half of them,
        which splits any tied pair with probability 1/2, all of C/2 pairs but with 2^(-C/2)."""
        channels = conv.out_channels
        probe = torch.randperm(channels, generator=torch.Generator().manual_seed(0))[: channels // 2]
        asked = set(probe.tolist())
        return any(item.dep.target.module is conv and self.graph.is_out_channel_pruning_fn(item.dep.handler)
                   and {int(i) for i in item.idxs} != asked for item in self._group(conv, sorted(asked)))

    def _group(self, conv: nn.Conv2d, idxs: Sequence[int]) -> tp.dependency.Group:
        return self.graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(idxs))

    def feasible(self, group: PrunableGroup, removed: Sequence[int], scores: torch.Tensor) -> tuple[int, ...]:
        """`removed` (root channel indices, sorted) less what would empty a layer of the group: where
        a member is narrower than the root (a concatenation, a slice) and would lose every channel,
        its highest-scoring removed channel (`scores` [C], higher = keep) is kept, at the same offset
        in every block when `group.blocks` > 1, until torch-pruning's `check_pruning_group` passes.
        `removed` itself wherever nothing is emptied."""
        removed = sorted(int(i) for i in removed)
        if not any(group.index_maps):  # every member as wide as the root: nothing narrower to empty
            return tuple(removed)
        size = group.num_channels // group.blocks
        while removed:
            emptied = self._emptied_item(self._group(group.convs[0], removed))
            if emptied is None:
                break
            kept = max((int(r) for r in emptied.root_idxs if int(r) in removed), key=lambda r: (float(scores[r]), -r))
            same_offset = {b * size + kept % size for b in range(group.blocks)}  # blocks stay equal
            removed = [r for r in removed if r not in same_offset]
        return tuple(removed)

    def _emptied_item(self, group: tp.dependency.Group) -> object | None:
        """The first item of `group` that would lose all its channels, None if none would."""
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if self.graph.is_out_channel_pruning_fn(handler):
                channels = self.graph.get_out_channels(module)
            elif self.graph.is_in_channel_pruning_fn(handler):
                channels = self.graph.get_in_channels(module)
            else:
                continue
            if channels is not None and channels <= len(item.idxs):
                return item
        return None

    def prune(self, group: PrunableGroup, removed: Sequence[int]) -> None:
        """Remove output channels `removed` of every conv in `group` (and what depends on them);
        with `group.blocks` > 1 the same offsets must go from every block (`block_positions`)."""
        if not removed:
            return
        if group.blocks > 1 and not _same_in_every_block(removed, group.num_channels, group.blocks):
            raise ValueError(f"group {group.name} has {group.blocks} channel blocks (grouped conv or GroupNorm) that "
                             "must keep equal sizes; remove the same offsets from every block (block_positions)")
        tp_group = self._group(group.convs[0], sorted(int(i) for i in removed))
        if not self.graph.check_pruning_group(tp_group):
            raise RuntimeError(f"torch-pruning refused to prune group {group.name}")
        frozen = [(m, name) for m in self.model.modules() for name, p in m.named_parameters(recurse=False)
                  if not p.requires_grad]
        root = group.convs[0]
        expected = root.out_channels - len(removed)
        tp_group.prune()
        for m, name in frozen:  # torch-pruning gives a pruned layer new (trainable) Parameters
            getattr(m, name).requires_grad_(False)
        if root.out_channels != expected:  # torch-pruning removed others than asked: never report what was not done
            raise RuntimeError(f"torch-pruning left {group.name} with {root.out_channels} channels instead of {expected}")

    def clone(self) -> Surgeon:
        """A Surgeon of a deep copy of the model (same groups in the same order; this one is untouched)."""
        return self._copy(self.groups)

    def _copy(self, groups: Sequence[PrunableGroup], *, share_parameters: bool = False) -> Surgeon:
        """A Surgeon of a deep copy of the model whose groups are `groups` on the copy's convs.
        `share_parameters`: the copy holds the model's very Parameter objects (no copy of the
        weights; buffers are still copied): for a copy that is only pruned (torch-pruning gives a
        pruned layer new Parameters and leaves the old ones as they were) and run without gradients."""
        memo: dict = {id(p): p for p in self.model.parameters()} if share_parameters else {}
        model = copy.deepcopy(self.model, memo)
        mine = [replace(g, convs=tuple(memo[id(c)] for c in g.convs)) for g in groups]
        return Surgeon(model, self.example, ignored_layers=[memo[id(m)] for m in self._ignored], verify=False,
                       groups=mine)

    def _working(self, groups: list[PrunableGroup]) -> tuple[list[PrunableGroup], list[str]]:
        """The groups after whose surgery the model still runs: on a copy, every other channel of
        each group in turn (`_trial_channels`) is removed and the copy run on the example input. A group
        whose surgery breaks the forward is left out (torch-pruning cannot rewrite, e.g., a
        `split` by constant sizes in a model's forward, as CSP networks have). Also what each left-out
        group broke ("name (error)")."""
        working: list[PrunableGroup] = []
        broken: list[str] = []
        twin: Surgeon | None = None  # made when a group is tried; one copy of the model at a time
        for i, group in enumerate(groups):
            if twin is None:
                gc.collect()  # a broken copy's dependency graph holds reference cycles: free it first
                twin = self._trial_twin(groups, working)
            trial = twin.groups[i]
            try:
                twin.prune(trial, twin.feasible(trial, _trial_channels(trial), torch.zeros(trial.num_channels)))
                with torch.no_grad():
                    twin.model(twin.example)
                working.append(group)
            except Exception as exc:  # a broken copy: whatever the forward or torch-pruning raises
                if out_of_memory(exc):
                    raise
                broken.append(f"{group.name} ({type(exc).__name__}: {first_line(exc)})")
                twin = trial = None  # remade from the working groups if another group is tried, once this one is freed
        del twin
        gc.collect()  # the copy's dependency graph holds reference cycles: free its pruned layers now
        return working, broken

    def _trial_twin(self, groups: list[PrunableGroup], pruned: list[PrunableGroup]) -> Surgeon:
        """A Surgeon of a copy of the model with `groups` (on the copy), the `_trial_channels` of
        each of `pruned` removed."""
        twin = self._copy(groups, share_parameters=True)
        names = {g.name for g in pruned}
        for trial in twin.groups:
            if trial.name in names:
                twin.prune(trial, twin.feasible(trial, _trial_channels(trial), torch.zeros(trial.num_channels)))
        return twin

    def pruned_copy(self, counts: Sequence[int], *, after_each: Callable[[nn.Module], object] | None = None) -> nn.Module:
        """A copy of the model with `counts[l]` output channels of group l removed (the first ones
        of each block, the count made `legal_count`: only the structure, e.g. its cost or speed,
        is meant to be read from it). `after_each(copy)` is called after each group's surgery."""
        if len(counts) != len(self.groups):
            raise ValueError(f"{len(counts)} channel counts for {len(self.groups)} groups")
        twin = self.clone()
        for group, n in zip(twin.groups, counts):
            per_block = legal_count(int(n), group.num_channels, group.blocks) // group.blocks
            first = block_positions(group.num_channels, group.blocks, range(per_block))
            twin.prune(group, twin.feasible(group, first, -torch.arange(group.num_channels, dtype=torch.float32)))
            if after_each is not None:
                after_each(twin.model)
        return twin.model

    def history(self) -> list:
        """torch-pruning's pruning history (plain lists: safe for weights_only loading)."""
        return [list(h) for h in self.graph.pruning_history()]


def _trial_channels(group: PrunableGroup) -> tuple[int, ...]:
    """What `Surgeon._working` removes to try a group: every other offset of each block (one
    channel kept per block at least), so that every part of a split or concatenation loses some."""
    size = group.num_channels // group.blocks
    return block_positions(group.num_channels, group.blocks, range(0, size - 1, 2) if size > 2 else [0])


def _index_map(member: nn.Conv2d, index_map: IndexMap, root_channels: int) -> IndexMap | None:
    """None when `member`'s channel i is the root's channel i for all i, else `index_map`."""
    identity = tuple(range(root_channels))
    same = member.out_channels == root_channels and index_map[0] == identity and index_map[1] == identity
    return None if same else index_map


def _dependency_graph(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module]) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph of `model` (built with grad enabled); UsageError in one
    line where torch-pruning cannot trace the model (e.g. a channel shuffle's reshape)."""
    try:
        return dependency_graph(model, example_inputs, ignored)
    except Exception as exc:  # torch-pruning's tracing raises many kinds on graphs it cannot map
        if out_of_memory(exc):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        why = first_line(exc)
        raise UsageError(
            f"torch-pruning cannot trace {type(model).__name__} ({type(exc).__name__} in {Path(where.filename).name}:"
            f" {why}), so its channels cannot be removed; torch-pruning does not map channel shuffles or other "
            "reshapes of the channel dim; choose another model") from None
