"""Knowledge distillation (Hinton et al. 2015): the pruned network learns from the labels and
from the unpruned network's softened outputs.

    loss = (1 − α)·CE(z_s, y) + α·T²·KL(softmax(z_t / T) ‖ softmax(z_s / T))

z_s, z_t: student and teacher logits [B, classes]; the KL is summed over classes and averaged
over the batch; T² keeps the soft term's gradients on the scale of the hard one whatever T.
Defaults α = 0.5, T = 4: an even split between labels and teacher, and the temperature of the
common CIFAR distillation benchmarks (Tian et al. 2020, CRD); `benchmarks.recovery` chooses
them per testbed on held-out images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_ALPHA", "DEFAULT_TEMPERATURE", "Distillation", "distillation_loss", "frozen_teacher"]

DEFAULT_ALPHA = 0.5
"""Weight α of the teacher's soft targets in [0, 1] (`--distill-alpha`): an even split of labels and teacher."""
DEFAULT_TEMPERATURE = 4.0
"""Softmax temperature T > 0 (`--distill-temperature`): the common CIFAR distillation benchmarks' T."""


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *,
                      alpha: float = DEFAULT_ALPHA, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """The loss above for logits `student`, `teacher` [B, K] and labels `targets` [B]; a scalar."""
    hard = F.cross_entropy(student, targets)
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


def frozen_teacher(model: nn.Module) -> nn.Module:
    """`model` itself, in eval mode with every parameter's requires_grad off (a teacher)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Distillation:
    """The training loss of `finetune.train.fit` with a frozen `teacher` (eval mode, no gradient):
    called with the student's logits [B, K], the images [B, ...] and labels [B]."""

    def __init__(self, teacher: nn.Module, *, alpha: float = DEFAULT_ALPHA,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        self.teacher = frozen_teacher(teacher)
        self.alpha = alpha
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(images)
        return distillation_loss(logits, teacher, targets, alpha=self.alpha, temperature=self.temperature)
