"""Channel surgery. The only module that touches torch-pruning's DependencyGraph.

A `PrunableGroup` is a set of conv layers whose output channels must be removed together
(one conv in a plain net; every conv feeding one residual addition in a ResNet). Groups come
in depth order (forward-execution order of their first conv), which torch-pruning itself
does not guarantee.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prune.errors import UsageError
from scoring.hooks import forward_hooks


@dataclass(frozen=True)
class PrunableGroup:
    """Convs tied by a dependency; `names[0]`/`convs[0]` is the shallowest (the root)."""

    names: tuple[str, ...]
    convs: tuple[nn.Conv2d, ...]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def num_channels(self) -> int:
        return int(self.convs[0].out_channels)


def channels_to_remove(num_channels: int, ratio: float, *, rule: str = "round") -> int:
    """How many of `num_channels` to remove at `ratio` (at least one channel is kept).

    rule "round": round(ratio·C) (the default). rule "floor-keep": keep ⌊(1−ratio)·C⌋, the
    rounding that reproduces the paper's Table 12 counts.
    """
    if rule == "round":
        n = round(ratio * num_channels)
    elif rule == "floor-keep":
        n = num_channels - math.floor((1.0 - ratio) * num_channels + 1e-9)
    else:
        raise UsageError(f"unknown rounding rule {rule!r}; use 'round' or 'floor-keep'")
    return max(0, min(n, num_channels - 1))


def _execution_order(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The convs of `model` in the order a forward pass first runs them."""
    order: list[nn.Module] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with forward_hooks(convs, lambda mod, _i, _o: order.append(mod)), torch.no_grad():
        model(example_inputs)
    return list(dict.fromkeys(order))


@torch.no_grad()
def classifier_convs(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """[the conv that is the classifier] when the last Conv2d/Linear a forward runs is a conv
    whose output channels are the model's outputs (SqueezeNet's 1x1 classifier conv); else [].
    Its channels are the classes: never pruned, as a Linear head is not."""
    order: list[nn.Module] = []
    heads = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with forward_hooks(heads, lambda mod, _i, _o: order.append(mod)):
        out = model(example_inputs)
    last = order[-1] if order else None
    if isinstance(last, nn.Conv2d) and isinstance(out, torch.Tensor) and out.ndim >= 2 \
            and out.shape[1] == last.out_channels:
        return [last]
    return []


class Surgeon:
    """Owns the dependency graph of `model` and removes output channels of conv groups
    (every Conv2d with groups=1 but a classifier conv, `classifier_convs`)."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        *,
        ignored_layers: Sequence[nn.Module] = (),
    ) -> None:
        self.model = model
        self.example = example_inputs
        self._names = {m: n for n, m in model.named_modules()}
        self._ignored = list(ignored_layers)
        self._classifiers = classifier_convs(model, example_inputs)  # its input channels still follow pruning
        with torch.enable_grad():
            self.graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, ignored_layers=self._ignored, verbose=False
            )
        self.groups = self._find_groups(_execution_order(model, example_inputs))
        if not self.groups:
            raise UsageError(
                "the model has no prunable conv layer (needs nn.Conv2d with groups=1); "
                "choose a CNN such as vgg16 or resnet34"
            )

    def _is_root_candidate(self, m: nn.Module) -> bool:
        return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels > 1
                and m not in self._ignored and m not in self._classifiers)

    def _find_groups(self, order: list[nn.Module]) -> list[PrunableGroup]:
        depth = {m: i for i, m in enumerate(order)}
        seen: set[nn.Module] = set()
        groups: list[PrunableGroup] = []
        for conv in order:
            if conv in seen or not self._is_root_candidate(conv):
                continue
            members = self._out_channel_convs(conv)
            seen.update(members)
            members = sorted(members, key=lambda m: depth.get(m, len(depth)))
            groups.append(
                PrunableGroup(
                    names=tuple(self._names[m] for m in members),
                    convs=tuple(members),
                )
            )
        return groups

    def _group(self, conv: nn.Conv2d, idxs: Sequence[int]) -> tp.dependency.Group:
        return self.graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(idxs))

    def _out_channel_convs(self, conv: nn.Conv2d) -> list[nn.Conv2d]:
        group = self._group(conv, [0])
        return [
            item.dep.target.module
            for item in group
            if isinstance(item.dep.target.module, nn.Conv2d)
            and item.dep.target.module.groups == 1
            and self.graph.is_out_channel_pruning_fn(item.dep.handler)
        ]

    def prune(self, group: PrunableGroup, removed: Sequence[int]) -> None:
        """Remove output channels `removed` of every conv in `group` (and what depends on them)."""
        if not removed:
            return
        tp_group = self._group(group.convs[0], sorted(int(i) for i in removed))
        if not self.graph.check_pruning_group(tp_group):
            raise RuntimeError(f"torch-pruning refused to prune group {group.name}")
        tp_group.prune()

    def clone(self) -> Surgeon:
        """A Surgeon of a deep copy of the model (same groups in the same order; this one is untouched)."""
        memo: dict = {}
        model = copy.deepcopy(self.model, memo)
        return Surgeon(model, self.example, ignored_layers=[memo[id(m)] for m in self._ignored])

    def pruned_copy(self, counts: Sequence[int]) -> nn.Module:
        """A copy of the model with `counts[l]` output channels of group l removed (the first ones:
        only the structure, e.g. its cost or speed, is meant to be read from it)."""
        if len(counts) != len(self.groups):
            raise ValueError(f"{len(counts)} channel counts for {len(self.groups)} groups")
        twin = self.clone()
        for group, n in zip(twin.groups, counts):
            twin.prune(group, range(int(n)))
        return twin.model

    def history(self) -> list:
        """torch-pruning's pruning history (plain lists: safe for weights_only loading)."""
        return [list(h) for h in self.graph.pruning_history()]


def _history_entry(graph: tp.DependencyGraph, model: nn.Module, entry: object) -> tuple[str, bool, list[int]]:
    """`entry` as (layer name, out-channel pruning?, channel indices) after checking that it
    fits `model` as pruned so far; ValueError or TypeError saying what does not."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
        raise ValueError(f"is {entry!r}, not [layer name, is_out_channel_pruning, channel indices]")
    name, out, idx = entry
    if not isinstance(name, str) or not isinstance(out, bool):
        raise TypeError(f"is {entry!r}: its layer name must be a str and its second item a bool")
    if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ValueError(f"for layer {name!r} has channel indices {idx!r}, not a list of ints")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"names layer {name!r}, which the model does not have") from None
    pruner = graph.get_pruner_of_module(module)
    channels = None if pruner is None else pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
    if channels is None:
        raise ValueError(f"names layer {name!r}, a {type(module).__name__}, which has no channels to prune")
    if len(set(idx)) != len(idx) or not all(0 <= i < channels for i in idx):
        raise ValueError(f"removes channels {sorted(idx)[:8]}{'...' if len(idx) > 8 else ''} of layer {name!r}, "
                         f"which has {channels} {'output' if out else 'input'} channels at that point")
    return name, out, list(idx)


def replay_history(model: nn.Module, example_inputs: torch.Tensor, history: list) -> None:
    """Apply a saved pruning history to a freshly built, unpruned `model` in place.

    Each entry is checked against the model as pruned by the entries before it (a layer of
    the model with channels, indices distinct and in range); ValueError "entry i ..." names
    the first that does not fit.
    """
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    for i, entry in enumerate(history):
        try:
            step = _history_entry(graph, model, entry)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"entry {i} {exc}") from None
        try:
            graph.load_pruning_history([step])
        except (ValueError, IndexError, KeyError, RuntimeError, AttributeError, TypeError) as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"entry {i} cannot be replayed ({type(exc).__name__}: {why})") from None
