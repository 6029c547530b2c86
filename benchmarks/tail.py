"""Logits of fixed images with some units of one conv layer zeroed: the rest of the network
after the unit is run on a cached copy of the unit's input (an fx split), or, where the model
cannot be split (a skip connection around the layer, untraceable code), the whole forward
with a masking hook. Used by the cumulative ablation and the criteria benchmark."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from benchmarks.layers import module_name
from prune import following_norm
from scoring.hooks import capture, forward_hooks, run_until_stopped


def unit_module(model: nn.Module, conv: nn.Conv2d) -> nn.Module:
    """The module whose output becomes the units after ReLU: the BN right after `conv`, or `conv`."""
    norm = following_norm(model, conv)
    return conv if norm is None else norm


@contextmanager
def channel_mask(module: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Multiply `module`'s output channels by `mask` [C] (0 = ablated) during the block."""

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * mask.to(out.dtype).view(1, -1, *([1] * (out.ndim - 2)))

    with forward_hooks([module], hook):
        yield


def _tail_graph(model: nn.Module, name: str) -> nn.Module | None:
    """The part of `model` after module `name`, as an fx GraphModule taking that module's
    output; None when tracing fails or later layers also need earlier values (skips)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # untraceable model: fall back to full forwards
        return None
    graph = gm.graph
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(nodes) != 1:
        return None
    with graph.inserting_after(inputs[-1]):
        units = graph.placeholder("units")
    nodes[0].replace_all_uses_with(units)
    graph.eliminate_dead_code()
    if any(n.users for n in inputs):
        return None
    for n in inputs:
        graph.erase_node(n)
    gm.recompile()
    return gm.eval()


class LayerTail:
    """Logits of fixed images with some units of one layer zeroed (cumulative ablation).

    The output of the unit module (BN after the conv, else the conv) is computed once; each
    call runs only the rest of the network (fx split) on that output times the mask, or, when
    the model cannot be split, the whole forward with a masking hook.
    """

    def __init__(self, model: nn.Module, conv: nn.Conv2d, images: torch.Tensor, *, batch_size: int = 256) -> None:
        self.model = model.eval()
        self.channels = conv.out_channels
        self.module = unit_module(model, conv)
        self.images = images
        self.batch_size = batch_size
        self.tail = _tail_graph(model, module_name(model, self.module))
        self.cached = self._capture() if self.tail is not None else None

    @torch.no_grad()
    def _capture(self) -> list[torch.Tensor]:
        with capture(self.module) as seen:
            for x in self.images.split(self.batch_size):
                run_until_stopped(self.model, x)
        return [y.clone() for y in seen]

    @torch.no_grad()
    def logits(self, mask: torch.Tensor) -> torch.Tensor:
        """Logits [N, K] with the units multiplied by `mask` [C] (1 = kept, 0 = ablated)."""
        return self.logits_many(mask.unsqueeze(0))[0]

    @torch.no_grad()
    def logits_many(self, masks: torch.Tensor, *, max_images: int = 4096) -> torch.Tensor:
        """Logits [S, N, K] for masks [S, C]; several masks share one tail call (fx split)."""
        if self.cached is None:
            out = []
            for mask in masks:
                with channel_mask(self.module, mask):
                    out.append(torch.cat([self.model(x) for x in self.images.split(self.batch_size)]))
            return torch.stack(out)
        per_call = max(1, max_images // self.batch_size)
        rows = []
        for chunk in masks.split(per_call):
            view = chunk.view(len(chunk), 1, -1, 1, 1)
            parts = []
            for z in self.cached:
                y = self.tail((z.unsqueeze(0) * view.to(z.dtype)).flatten(0, 1))
                parts.append(y.view(len(chunk), len(z), -1))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)
