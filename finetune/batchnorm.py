"""Re-estimating BatchNorm statistics after pruning (no weight changes)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, *, batches: int, device: torch.device | str) -> int:
    """Reset every BatchNorm's running mean/var and re-estimate them as the plain average over
    the first `batches` batches of `loader` (momentum None). Other modules stay in eval mode,
    weights are untouched; the model is left in eval mode. Returns the number of images used.

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
    used = 0
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            if len(x):
                model(x.to(device))
                used += len(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return used
