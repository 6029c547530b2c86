"""SGD fine-tuning with the paper's step schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import ddp
from finetune.schedule import step_lr


@dataclass(frozen=True)
class FinetuneConfig:
    """Paper defaults: SGD, lr 1e-3 ÷10 per epoch, 3 epochs. Momentum 0.9 and weight decay
    5e-4 are the VGG training defaults (the paper does not state them)."""

    epochs: int = 3
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str,
    desc: str = "fine-tune",
    quiet: bool = False,
) -> float:
    """One pass over `loader`; returns the mean training loss (over all ranks under DDP).

    Empty batches (every image unreadable) are skipped.
    """
    model.train()
    total, count = 0.0, 0
    with ddp.join(model):
        for x, y in tqdm(loader, desc=desc, disable=quiet, leave=False):
            if len(y) == 0:
                continue
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
    return ddp.mean_over_ranks(total, count, torch.device(device))


def finetune(
    model: nn.Module,
    loader: DataLoader,
    *,
    config: FinetuneConfig = FinetuneConfig(),
    device: torch.device | str = "cpu",
    quiet: bool = False,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, float], None] | None = None,
    seed: int = 0,
) -> list[float]:
    """Fine-tune `model` in place; returns the mean loss of each epoch run.

    `start_epoch`/`optimizer` resume an interrupted run; `on_epoch_end(epoch, optimizer,
    loss)` is called after each epoch (e.g. to write a checkpoint). Each epoch reseeds torch
    and the loader's sampler with `seed + epoch`, so a resumed run repeats an uninterrupted one.
    """
    if optimizer is None:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    losses = []
    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(seed + epoch)
        generator = getattr(loader.sampler, "generator", None)
        if generator is not None:
            generator.manual_seed(seed + epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = step_lr(config.lr, epoch, decay=config.lr_decay)
        loss = train_one_epoch(
            model, loader, optimizer, device=device, desc=f"fine-tune {epoch + 1}/{config.epochs}", quiet=quiet
        )
        losses.append(loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch, optimizer, loss)
    return losses
