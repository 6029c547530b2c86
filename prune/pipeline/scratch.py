"""The scratch baseline (`--reinit`): the pruned architecture with fresh random weights, trained
as the unpruned network was (Liu et al., ICLR 2019, "Rethinking the value of network pruning":
Scratch-E, the same epochs as the unpruned network's training).

Every module's own `reset_parameters` (BatchNorm statistics included) runs, then the model's
`init_weights()` where it has one (the shipped models: the initialisation they were trained
from). A shipped model is then trained with its own recipe (`prune.zoo.train_embedded.RECIPES`:
epochs, batch, lr, Nesterov SGD, warm-up + cosine, flips); any other model with the run's
fine-tuning settings (`--epochs`, `--lr`, `--lr-schedule`, ...) from its fresh weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset

from prune.zoo.data import make_loader

__all__ = ["reinitialise", "stacked", "train_recipe"]


@torch.no_grad()
def reinitialise(model: nn.Module, *, seed: int) -> nn.Module:
    """`model` in place with fresh weights drawn after `torch.manual_seed(seed)` (shapes kept)."""
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    init = getattr(model, "init_weights", None)
    if callable(init):
        init()
    return model


def stacked(dataset: Dataset, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable (image, label) of `dataset` in order: images [N, 3, s, s], labels [N]."""
    images, labels = [], []
    for x, y in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def train_recipe(model: nn.Module, dataset: Dataset, variant: str, *, seed: int, device: torch.device,
                 quiet: bool = False) -> list[float]:
    """Train `model` in place on `dataset` with the shipped `variant`'s recipe (seeded by `seed`);
    each epoch's mean loss."""
    from prune.zoo.embedded_model import VARIANTS
    from prune.zoo.recipes import RECIPES
    from prune.zoo.train_embedded import fit_embedded

    images, labels = stacked(dataset)
    torch.manual_seed(seed)
    vertical = VARIANTS[variant].dataset == "shapes10"
    return fit_embedded(model, images, labels, config=replace(RECIPES[variant], seed=seed), vertical_flips=vertical,
                        desc="scratch", quiet=quiet, device=device)
