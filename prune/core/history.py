"""Replaying a saved pruning history (torch-pruning's `(layer, out?, indices)` entries) on a freshly
built network: how a checkpoint is loaded (`prune.load_pruned`) and how the pipeline rebuilds a
pruned copy."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from prune.errors import first_line
from scoring.dependency import dependency_graph


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
    graph = dependency_graph(model, example_inputs)
    for i, entry in enumerate(history):
        try:
            step = _history_entry(graph, model, entry)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"entry {i} {exc}") from None
        try:
            graph.load_pruning_history([step])
        except (ValueError, IndexError, KeyError, RuntimeError, AttributeError, TypeError) as exc:
            why = first_line(exc)
            raise ValueError(f"entry {i} cannot be replayed ({type(exc).__name__}: {why})") from None
