"""The dependency graph's trace keeps no activation alive, and the graph still groups channels."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch_pruning as tp
from torch import nn

from scoring.dependency import dependency_graph


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _traced_activations(build) -> tuple[object, list[weakref.ref]]:
    """Build a graph of `_chain()` with `build`; weak references to the outputs of every module but
    the last (the logits, torch-pruning's root) in the trace's forwards."""
    model, refs = _chain(), []
    handles = [m.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out))) for m in model[:-1]]
    graph = build(model)
    for h in handles:
        h.remove()
    gc.collect()
    return graph, refs


def test_the_trace_keeps_no_activation_alive_while_the_graph_lives() -> None:
    graph, refs = _traced_activations(lambda m: dependency_graph(m, torch.zeros(1, 3, 6, 6)))
    assert len(refs) >= 5
    assert all(r() is None for r in refs)


def test_torch_prunings_own_trace_does_keep_them_so_the_test_above_can_fail() -> None:
    def plain(m: nn.Module) -> object:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(m, example_inputs=torch.zeros(1, 3, 6, 6))

    graph, refs = _traced_activations(plain)
    assert any(r() is not None for r in refs)


def test_the_graph_still_groups_a_conv_with_its_consumer() -> None:
    model = _chain()
    graph = dependency_graph(model, torch.zeros(1, 3, 6, 6))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[0, 1])
    assert model[2] in {item.dep.target.module for item in group}
    group.prune()
    assert model[0].out_channels == 6 and model[2].in_channels == 6
    assert model(torch.zeros(1, 3, 6, 6)).shape == (1, 2)


class _GradientInForward(nn.Module):
    """A conv whose forward also takes a gradient of its own output (as gradient-based layers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        (g,) = torch.autograd.grad(y.square().sum(), y, create_graph=True)
        return self.head(y + 0 * g)


def test_a_model_that_runs_a_backward_in_its_forward_is_still_traced() -> None:
    model = _GradientInForward()
    graph = dependency_graph(model, torch.rand(1, 3, 5, 5))
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=[0])
    assert model.head in {item.dep.target.module for item in group}


def test_a_trace_that_fails_leaves_no_hook_behind() -> None:
    """torch-pruning removes its tracing hooks only after a forward that succeeds."""

    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv(x)
            raise RuntimeError("a forward that cannot be traced")

    model = Failing()
    with pytest.raises(RuntimeError, match="cannot be traced"):
        dependency_graph(model, torch.zeros(1, 3, 6, 6))
    assert not any(m._forward_hooks for m in model.modules())
