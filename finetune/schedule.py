"""Learning-rate schedules: the paper's step schedule for fine-tuning (lr, lr/10, lr/100, one
epoch each) and the warm-up + cosine schedule that trains the embedded model."""

from __future__ import annotations

import math

SCHEDULES = ("step", "cosine")
"""The fine-tuning schedules (`finetune.train.FinetuneConfig.schedule`, `--lr-schedule`)."""


def step_lr(base_lr: float, epoch: int, *, decay: float = 0.1) -> float:
    """Learning rate of `epoch` (0-based): base_lr · decay^epoch.

    With base_lr 1e-3 and 3 epochs this is 1e-3, 1e-4, 1e-5: the paper's schedule, which
    stops after the 1e-5 epoch.
    """
    return base_lr * decay**epoch


def warmup_cosine_lr(step: int, *, total: int, warmup: int, base: float) -> float:
    """Learning rate of optimisation `step` (0-based): linear warm-up over `warmup` steps,
    then cosine decay from `base` to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
