"""Re-estimating BatchNorm statistics after pruning (no weight changes)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


def has_batchnorm(model: nn.Module) -> bool:
    """True if `model` holds a BatchNorm layer (of any dimension)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def lone_remainder(images: int, largest: int, *, batch_norm: bool) -> bool:
    """True for a batch of one image, after a batch of `largest` > 1 images, on a BatchNorm
    model: a train-mode forward of it fails where a map is 1x1 ("Expected more than 1 value
    per channel when training") and otherwise takes one image's statistics, so it is skipped
    (like DataLoader's drop_last, but only for a last batch of one image; with batch size 1
    every batch has one image and none is skipped)."""
    return batch_norm and images == 1 and largest > 1


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, *, batches: int, device: torch.device | str) -> int:
    """Reset every BatchNorm's running mean/var and re-estimate them as the plain average over
    the first `batches` batches of `loader` (momentum None). Other modules stay in eval mode,
    weights are untouched; the model is left in eval mode. Returns the number of images used.
    A last batch of one image after larger ones is skipped (`lone_remainder`); it counts
    among the `batches`.

    After pruning, the channels removed from layer l change the inputs of layer l+1, so its
    BatchNorm statistics no longer fit; this restores them before any fine-tuning.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = largest = 0
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            if len(x) and not lone_remainder(len(x), largest, batch_norm=True):
                model(x.to(device))
                used += len(x)
            largest = max(largest, len(x))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return used
