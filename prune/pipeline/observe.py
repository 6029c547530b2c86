"""Collecting a layer's units: hooks owned by a context manager, so none ever leaks.

A unit is one output channel of a conv layer observed after its activation:
relu(norm(conv(x))) where `norm` is the BatchNorm that directly consumes the conv's output
(if any). The forward pass stops as soon as the units are captured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prune.errors import UsageError

CHUNK_BYTES = 1 << 27
"""Units of one forward chunk are kept under this size (128 MiB) when scoring."""


class _Captured(Exception):
    """Raised inside a hook to end the forward pass early."""


def following_norm(model: nn.Module, conv: nn.Conv2d) -> nn.Module | None:
    """The BatchNorm registered right after `conv` with matching width, if any."""
    modules = list(model.modules())
    i = next(k for k, m in enumerate(modules) if m is conv)
    nxt = modules[i + 1] if i + 1 < len(modules) else None
    if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == conv.out_channels:
        return nxt
    return None


@contextmanager
def observe(model: nn.Module, conv: nn.Conv2d) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward of `model` appends the units [N, C, m, m] of `conv`.

    Use `run_until_captured(model, x)` to forward; the hooks are removed on exit.
    """
    captured: list[torch.Tensor] = []
    norm = following_norm(model, conv)
    conv_out: dict[str, torch.Tensor] = {}

    def finish(t: torch.Tensor) -> None:
        captured.append(torch.relu(t).detach())
        raise _Captured

    def on_conv(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        if norm is None:
            finish(out)
        conv_out["t"] = out

    def on_norm(_m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if inputs[0] is conv_out.get("t"):
            finish(out)

    handles = [conv.register_forward_hook(on_conv)]
    if norm is not None:
        handles.append(norm.register_forward_hook(on_norm))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_until_captured(model: nn.Module, images: torch.Tensor) -> None:
    """Forward `images` through `model`, stopping once an `observe` hook has its units."""
    try:
        model(images)
    except _Captured:
        pass


@torch.no_grad()
def collect_units(
    model: nn.Module, conv: nn.Conv2d, images: torch.Tensor, *, name: str, batch_size: int = 128
) -> torch.Tensor:
    """Units of `conv` for `images` [N, 3, H, W] → [N, C, m, m] float32 CPU, filled chunk by chunk.

    The first chunk is one image; later chunks hold at most `batch_size` images and about
    CHUNK_BYTES of units. NaN/Inf activations raise UsageError.
    """
    device = next(model.parameters()).device
    units: torch.Tensor | None = None
    start, step = 0, 1
    with observe(model, conv) as captured:
        while start < len(images):
            run_until_captured(model, images[start : start + step].to(device))
            chunk = captured.pop().float().cpu()
            if not torch.isfinite(chunk).all():
                raise UsageError(
                    f"activations of layer {name} contain NaN or Inf; check the model's weights "
                    "(--weights) and the input normalisation"
                )
            if units is None:
                units = torch.empty((len(images), *chunk.shape[1:]), dtype=torch.float32)
                step = max(1, min(batch_size, CHUNK_BYTES // max(chunk[0].numel() * 4, 1)))
            units[start : start + len(chunk)] = chunk
            start += len(chunk)
            del chunk
    assert units is not None
    return units
