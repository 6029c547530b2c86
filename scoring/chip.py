"""CHIP (Sui et al., NeurIPS 2021): channel independence. A channel whose maps the other
channels of its layer can express adds little to the layer's nuclear norm; remove it first.

Per image, the layer's C post-activation maps are the rows of A [C, m·m];
CI_c = ‖A‖_* − ‖A with row c zeroed‖_* ≥ 0 (zeroing a row never raises the nuclear norm), and
score[c] is the mean CI_c over every scoring image (classes pooled: CHIP ignores classes, unlike
feature entropy). Computed exactly from the Gram matrix G = A·Aᵀ [C, C] in float64: ‖A‖_* is the
sum of the square roots of G's eigenvalues, and A with row c zeroed has the Gram matrix of G
without row and column c (plus a zero eigenvalue), so each image costs one C×C Gram matrix and C
symmetric eigenproblems of size C−1 instead of C + 1 SVDs of C × m² matrices. A dead unit (a
zero row) has CI exactly 0. Per-class sums are kept apart and added in class order, so chunks and
shards give bit-identical scores.
"""

from __future__ import annotations

import torch

from scoring.activations import checked_activations
from scoring.base import ClassBatch
from scoring.chunked import PerClassSums
from scoring.registry import register

EIG_BATCH = 64
"""Eigenproblems solved at once (memory EIG_BATCH · C² doubles)."""


def nuclear_norm_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Σ √λ over the eigenvalues of symmetric PSD `gram` [..., k, k] (negative rounding clamped to 0) → [...]."""
    if gram.shape[-1] == 0:
        return gram.new_zeros(gram.shape[:-2])
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum(dim=-1)


def channel_independence(maps: torch.Tensor) -> torch.Tensor:
    """CI [C] of one image's maps [C, m, m] (float64), as in the module doc."""
    c = maps.shape[0]
    a = maps.reshape(c, -1)
    gram = a @ a.T
    whole = nuclear_norm_from_gram(gram)
    keep = torch.tensor([[j for j in range(c) if j != i] for i in range(c)], dtype=torch.long).reshape(c, c - 1)
    without = torch.cat([nuclear_norm_from_gram(gram[rows[:, :, None], rows[:, None, :]])
                         for rows in keep.split(EIG_BATCH)])
    ci = whole - without
    return torch.where(a.abs().sum(dim=1) == 0, torch.zeros_like(ci), ci)


@register("chip", needs_data=True,
          description="channel independence: nuclear-norm drop when the unit's maps are zeroed, classes pooled "
          "(Sui et al. 2021, CHIP)")
class ChipScorer(PerClassSums):
    """score[c] = mean CI_c over the images; [C], higher = keep."""

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """Activations [n, C, m, m] → each image's CI [n, C] float64."""
        acts = checked_activations(self, batch)
        return torch.stack([channel_independence(image) for image in acts])

    def compute(self) -> torch.Tensor:
        return self.pooled_mean().float()
