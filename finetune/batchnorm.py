"""Re-estimating BatchNorm statistics after pruning (no weight changes)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator

import torch
from torch import nn


def has_batchnorm(model: nn.Module) -> bool:
    """True if `model` holds a BatchNorm layer (of any dimension)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def running_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `model` that keep running statistics (what a refit re-estimates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def lone_remainder(images: int, largest: int, *, batch_norm: bool) -> bool:
    """True for a batch of one image, after a batch of `largest` > 1 images, on a BatchNorm
    model: a train-mode forward of it fails where a map is 1x1 ("Expected more than 1 value
    per channel when training") and otherwise takes one image's statistics, so it is skipped
    (like DataLoader's drop_last, but only for a last batch of one image; with batch size 1
    every batch has one image and none is skipped)."""
    return batch_norm and images == 1 and largest > 1


def batches_run(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], batches: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(position, images) of the batches among the first `batches` of `loader` that
    `recalibrate_batchnorm` forwards: not empty, and not a last batch of one image after larger
    ones (`lone_remainder`; it counts among the `batches`)."""
    largest = 0
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        if len(x) and not lone_remainder(len(x), largest, batch_norm=True):
            yield i, x
        largest = max(largest, len(x))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, batches: int,
                          device: torch.device | str, kept: Collection[nn.Module] = (),
                          forward: Callable[[int, torch.Tensor], object] | None = None) -> int:
    """Reset every BatchNorm's running mean/var and re-estimate them as the plain average over
    the first `batches` batches of `loader` (momentum None). Other modules stay in eval mode,
    weights are untouched; the model is left in eval mode. Returns the number of images used
    (`batches_run`: a last batch of one image after larger ones is skipped).

    After pruning, the channels removed from layer l change the inputs of layer l+1, so its
    BatchNorm statistics no longer fit; this restores them before any fine-tuning.

    `forward(i, images)` runs batch i (images [b, ...] on `device`) instead of `model(images)`,
    e.g. from a cut a cache holds (`prune.pipeline.refit`); BatchNorms in `kept` keep their
    statistics (neither reset nor re-estimated: `forward` must not run them).
    """
    norms = [m for m in running_norms(model) if m not in kept]
    if not norms or batches <= 0:
        return 0
    run = forward if forward is not None else (lambda _i, images: model(images))
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for i, x in batches_run(loader, batches):
            run(i, x.to(device))
            used += len(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return used
