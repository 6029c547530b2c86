"""A model's state that helpers read or set for a while: the device its parameters are on, its
modules' train/eval flags (set for a block, restored after it), an input it runs on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode inside the block; every module's own flag is restored on exit,
    also when the block raises (a model mixing train and eval modules gets its mix back)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of `model`'s first floating-point parameter (float32 for a model with none):
    what its input images must be."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


PROBE_SIZES = (32, 64, 224)
"""Input sides `probe_input` tries, smallest first, to trace a model a scorer has no input for."""


def probe_input(model: nn.Module) -> torch.Tensor | None:
    """A zero image [1, 3, s, s] on `model`'s device that `model` runs on (s from PROBE_SIZES), or None."""
    device = model_device(model)
    for side in PROBE_SIZES:
        example = torch.zeros(1, 3, side, side, device=device)
        try:
            with torch.no_grad(), eval_mode(model):
                model(example)
        except (RuntimeError, ValueError, AssertionError):
            continue
        return example
    return None
