"""torch-pruning's DependencyGraph, traced without keeping the trace's activations.

torch-pruning traces one forward with autograd on and keeps each node's `grad_fn`, which
holds every tensor the forward saved for a backward that never runs (VGG16 at 224²: 0.19 GiB
for as long as the graph lives). It reads only the sizes and dims those nodes record, never a
saved tensor, so the trace here saves none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class _NoSavedTensors(RuntimeError):
    """A backward ran inside the traced forward (a model that calls autograd itself)."""


def _no_saved_tensor(_: object) -> torch.Tensor:
    raise _NoSavedTensors("the dependency graph's trace keeps no tensors for a backward")


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor, ignored: Sequence[nn.Module] = ()) -> Any:
    """torch-pruning's DependencyGraph of `model` traced on `example_inputs` (grad enabled, no
    saved activations kept; traced again keeping them if the forward runs a backward itself).
    Frozen parameters (requires_grad False, e.g. a frozen backbone) are traced as trainable ones
    and frozen again after: the trace follows autograd, which skips a layer no gradient reaches."""
    import torch_pruning as tp

    def build() -> Any:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                     ignored_layers=list(ignored), verbose=False)

    hooks = {m: set(m._forward_hooks) for m in model.modules()}
    frozen = [p for p in model.parameters() if not p.requires_grad and (p.is_floating_point() or p.is_complex())]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            try:
                with torch.autograd.graph.saved_tensors_hooks(lambda _: None, _no_saved_tensor):
                    return build()
            except _NoSavedTensors:
                return build()
    finally:  # torch-pruning removes its tracing hooks only after a forward that succeeds
        for p in frozen:
            p.requires_grad_(False)
        for module, before in hooks.items():
            for key in set(module._forward_hooks) - before:
                del module._forward_hooks[key]
