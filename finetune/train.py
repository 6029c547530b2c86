"""The one training loop (`fit`), and the paper's fine-tuning on it (`finetune`: SGD with the
step schedule). Schedules, augmentation and per-epoch set-up are callbacks, so the embedded
model's training (`prune.zoo.train_embedded`) and the experiments run the same loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune import ddp
from finetune.batches import Batches
from finetune.batchnorm import has_batchnorm, lone_remainder
from finetune.checkpoint import CheckpointFile, restore, save
from finetune.schedule import step_lr, warmup_cosine_lr


class Diverged(ValueError):
    """The training loss became NaN or infinite: the weights are lost (e.g. a learning rate too large)."""


LrSchedule = Callable[[int, int], float]
"""lr(epoch, batch): learning rate of an epoch's batch-th optimisation step (both 0-based)."""
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""loss(logits [B, K], images [B, ...], labels [B]) → scalar: the training loss (e.g. `Distillation`)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Paper defaults: SGD, lr 1e-3 ÷10 per epoch, 3 epochs. Momentum 0.9 and weight decay
    5e-4 are the VGG training defaults (the paper does not state them)."""

    epochs: int = 3
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1
    schedule: str = "step"
    """"step": lr · lr_decay^epoch; "cosine": linear warm-up over `warmup` of the steps, then cosine to 0."""
    warmup: float = 0.05
    """Fraction of the optimisation steps the cosine schedule warms up over (at least one step)."""

    def lr_at(self, steps_per_epoch: int | None = None) -> LrSchedule:
        """The schedule lr(epoch, batch) of these settings for `steps_per_epoch` batches per epoch
        (needed by the cosine schedule only)."""
        if self.schedule == "step":
            return lambda epoch, _batch: step_lr(self.lr, epoch, decay=self.lr_decay)
        total = self.epochs * steps_per_epoch
        warmup = max(1, round(self.warmup * total))
        return lambda epoch, batch: warmup_cosine_lr(epoch * steps_per_epoch + batch, total=total, warmup=warmup,
                                                     base=self.lr)


def _one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    lr: LrSchedule,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device | str,
    desc: str,
    quiet: bool,
    loss_fn: Loss | None = None,
) -> float:
    """One pass over `batches`; the mean training loss (over all ranks under DDP). Empty
    batches and, on a BatchNorm model, a one-image batch after larger ones are skipped."""
    model.train()
    total, count, largest = 0.0, 0, 0
    batch_norm = has_batchnorm(model)
    with ddp.join(model):
        for i, (x, y) in enumerate(tqdm(batches, desc=desc, disable=quiet, leave=False)):
            skip = len(y) == 0 or lone_remainder(len(y), largest, batch_norm=batch_norm)
            largest = max(largest, len(y))
            if skip:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr(epoch, i)
            if augment is not None:
                x = augment(x)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
    return ddp.mean_over_ranks(total, count, torch.device(device))


def fit(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    lr: LrSchedule,
    device: torch.device | str = "cpu",
    start_epoch: int = 0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    desc: str = "train",
    quiet: bool = False,
    loss_fn: Loss | None = None,
) -> list[float]:
    """Train `model` in place with cross-entropy (or `loss_fn`) for epochs `start_epoch`..`epochs`−1 (0-based);
    returns the mean loss of each epoch run. `batches` is iterated once per epoch (a
    DataLoader, or `finetune.batches.Shuffled` for tensors in memory).

    Per epoch: `on_epoch_start(epoch)` (e.g. reseed), train mode, one pass over `batches`
    with the optimiser's lr set to `lr(epoch, batch)` before each step and `augment` applied
    to each batch of images before it moves to `device`; then eval mode and
    `on_epoch_end(epoch, mean_loss)`. Empty batches (every image unreadable) are skipped,
    and so is, on a model with BatchNorm, a batch of one image after larger ones (a last
    batch of one: train-mode BatchNorm cannot take it where a map is 1x1; see
    `finetune.batchnorm.lone_remainder`), as DataLoader's drop_last would, for that case only.
    """
    losses = []
    for epoch in range(start_epoch, epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        loss = _one_epoch(model, batches, optimizer, epoch=epoch, lr=lr, augment=augment, device=device,
                          desc=f"{desc} {epoch + 1}/{epochs}", quiet=quiet, loss_fn=loss_fn)
        if not math.isfinite(loss):  # the mean over all ranks: every rank stops alike, before the epoch is saved
            raise Diverged(f"the mean training loss of epoch {epoch + 1} is {loss}")
        model.eval()
        losses.append(loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch, loss)
    return losses


def finetune(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    config: FinetuneConfig = FinetuneConfig(),
    device: torch.device | str = "cpu",
    quiet: bool = False,
    seed: int = 0,
    checkpoint: CheckpointFile | None = None,
    loss_fn: Loss | None = None,
) -> list[float]:
    """Fine-tune `model` (or its DDP wrapper) in place with SGD and `config.schedule`; returns
    each epoch's mean loss. `loss_fn` replaces cross-entropy (e.g. `finetune.distillation.Distillation`).

    With a `checkpoint` file, the state after each epoch is written to it, and a run finding a
    checkpoint there that fits `model` continues after its epoch (`finetune.checkpoint`; the
    losses returned then include the epochs done before). Each epoch reseeds torch and the
    loader's sampler with `seed + epoch`, so a resumed run repeats an uninterrupted one.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    progress = restore(checkpoint, ddp.unwrap(model), optimizer)

    def reseed(epoch: int) -> None:
        torch.manual_seed(seed + epoch)
        generator = getattr(loader.sampler, "generator", None)
        if generator is not None:
            generator.manual_seed(seed + epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)

    def epoch_done(epoch: int, loss: float) -> None:
        progress.losses.append(loss)
        if checkpoint is not None:
            save(checkpoint, epoch, progress, ddp.unwrap(model), optimizer)

    fit(
        model, loader, optimizer, epochs=config.epochs,
        lr=config.lr_at(len(loader) if config.schedule == "cosine" else None), device=device, start_epoch=progress.start_epoch, on_epoch_start=reseed,
        on_epoch_end=epoch_done, desc="fine-tune", quiet=quiet, loss_fn=loss_fn,
    )
    return progress.losses
