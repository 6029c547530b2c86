"""Forward hooks owned by a context manager, so that no hook outlives its block."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

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
