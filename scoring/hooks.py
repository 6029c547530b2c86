"""Forward hooks owned by a context manager, so that no hook outlives its block, and the one
way a hook ends a forward pass early (`StopForward`, `capture`, `run_until_stopped`)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from scoring.model_state import eval_mode

PASS_BYTES = 32 * 2**20
"""Most bytes of the largest tensor of one forward pass a scorer makes itself (`images_per_pass`),
as the pipeline's forward chunks are bounded."""

ForwardHook = Callable[[nn.Module, tuple, Any], Any]
"""hook(module, inputs, output) → None, or a replacement output."""


@contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: ForwardHook) -> Iterator[None]:
    """Register `hook` as a forward hook on each of `modules` for the block's duration.

    Every handle is removed on exit, also when the block (or a later registration) raises.
    """
    handles: list[RemovableHandle] = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def run_until_stopped(model: nn.Module, *inputs: Any) -> None:
    """Forward `inputs` through `model`; a StopForward raised by a hook ends the pass quietly."""
    try:
        model(*inputs)
    except StopForward:
        pass


@contextmanager
def capture(module: nn.Module, *, inputs: bool = False) -> Iterator[list[torch.Tensor]]:
    """Inside: each forward that reaches `module` appends its output (its first input with
    `inputs=True`) to the list, as is (still in the autograd graph when grad is on), and stops
    the pass (use `run_until_stopped`)."""
    seen: list[torch.Tensor] = []

    def grab_output(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        seen.append(out)
        raise StopForward

    def grab_input(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise StopForward

    handle = module.register_forward_pre_hook(grab_input) if inputs else module.register_forward_hook(grab_output)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def largest_output(model: nn.Module) -> Iterator[list[int]]:
    """Inside, `box[0]` is the size in bytes of the largest tensor any module of `model` output."""
    box = [0]

    def record(_m: nn.Module, _i: tuple, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                box[0] = max(box[0], t.numel() * t.element_size())

    with forward_hooks(model.modules(), record):
        yield box


@torch.no_grad()
def images_per_pass(model: nn.Module, image: torch.Tensor, *, most: int | None = None) -> int:
    """Images per forward pass of `model` such that the largest tensor any module outputs for
    `image` [1, 3, H, W], times that number, stays within PASS_BYTES (at least 1, at most `most`).
    One forward of `image` (`run_until_stopped`: a hook's StopForward ends it). VGG16 at 224²: 2."""
    with largest_output(model) as largest:
        run_until_stopped(model, image)
    fit = max(1, PASS_BYTES // max(largest[0], 1))
    return fit if most is None else min(most, fit)


def execution_order(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The convs of `model` in the order a forward pass of `example_inputs` first runs them (a conv
    that does not run, as an auxiliary head in eval mode, is not listed)."""
    order, _ = run_order(model, example_inputs, (nn.Conv2d,))
    return list(dict.fromkeys(order))


@torch.no_grad()
def run_order(model: nn.Module, example_inputs: torch.Tensor, kinds: tuple[type, ...]) -> tuple[list[nn.Module], Any]:
    """(the modules of `kinds` in the order a forward of `example_inputs` runs them, every call
    listed; the forward's output). The model's mode is left as it is."""
    order: list[nn.Module] = []
    with forward_hooks([m for m in model.modules() if isinstance(m, kinds)], lambda mod, _i, _o: order.append(mod)):
        out = model(example_inputs)
    return order, out


def last_run(model: nn.Module, example_inputs: torch.Tensor, kinds: tuple[type, ...]) -> nn.Module | None:
    """The module of `kinds` a forward of `example_inputs` runs last; None if none runs."""
    order, _ = run_order(model, example_inputs, kinds)
    return order[-1] if order else None


@torch.no_grad()
def map_sizes(model: nn.Module, example_inputs: torch.Tensor, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(height, width) of the maps each named module outputs [N, C, H, W] on a forward of `example_inputs`."""
    wanted = {model.get_submodule(n): n for n in names}
    sizes: dict[str, tuple[int, int]] = {}

    def record(module: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        sizes[wanted[module]] = (int(out.shape[-2]), int(out.shape[-1]))

    with forward_hooks(wanted, record):
        model(example_inputs)
    return sizes


def width(layer: nn.Conv2d | nn.Linear) -> int:
    """Output channels of a Conv2d, output features of a Linear."""
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def logits_layer(model: nn.Module, example_inputs: torch.Tensor) -> tuple[nn.Conv2d | nn.Linear | None, int | None]:
    """(the nn.Conv2d or nn.Linear a forward of `example_inputs` runs last, if its width is the
    logits' (None if not: a head applied as F.linear to its weights runs none); the logits' width,
    the output's dim 1, None if the output is no such tensor)."""
    order, out = run_order(model, example_inputs, (nn.Conv2d, nn.Linear))
    classes = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim >= 2 else None
    return (order[-1] if order and width(order[-1]) == classes else None), classes


def classifier_convs(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """[the conv that is the classifier] when the layer that gives the logits (`logits_layer`) is a
    conv (SqueezeNet's 1x1 classifier conv); else []. Its channels are the classes: never pruned,
    as a Linear head is not."""
    head, _ = logits_layer(model, example_inputs)
    return [head] if isinstance(head, nn.Conv2d) else []


def is_depthwise(m: nn.Module) -> bool:
    """torch-pruning's depthwise conv: one output channel per group (its in and out channels are tied)."""
    return isinstance(m, nn.Conv2d) and m.groups == m.out_channels and m.out_channels > 1


def may_prune(m: nn.Module, classifiers: Collection[nn.Module] = ()) -> bool:
    """Whether `m` is a conv whose output channels the pipeline may remove: an nn.Conv2d with at
    least two output channels, not depthwise, not one of `classifiers` (`classifier_convs`)."""
    return isinstance(m, nn.Conv2d) and m.out_channels > 1 and not is_depthwise(m) and m not in classifiers


def prunable_convs(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Conv2d]:
    """The convs whose output channels the pipeline may prune (`may_prune`), in execution order
    (eval mode): only convs a forward runs; what scorers check before scoring."""
    with eval_mode(model):
        order = execution_order(model, example_inputs)
        classifiers = classifier_convs(model, example_inputs)
    return [m for m in order if may_prune(m, classifiers)]
