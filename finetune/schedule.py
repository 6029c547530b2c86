"""Learning-rate schedule of the paper's fine-tuning: lr, lr/10, lr/100 (one epoch each)."""

from __future__ import annotations


def step_lr(base_lr: float, epoch: int, *, decay: float = 0.1) -> float:
    """Learning rate of `epoch` (0-based): base_lr · decay^epoch.

    With base_lr 1e-3 and 3 epochs this is 1e-3, 1e-4, 1e-5: the paper's schedule, which
    stops after the 1e-5 epoch.
    """
    return base_lr * decay**epoch
