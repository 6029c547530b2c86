"""CHIP (Sui et al., NeurIPS 2021): channel independence. A channel whose maps the other
channels of its layer can express adds little to the layer's nuclear norm; remove it first.

Per image, the layer's C post-activation maps are the rows of A [C, m·m];
CI_c = ‖A‖_* − ‖A with row c zeroed‖_* ≥ 0 (zeroing a row never raises the nuclear norm), and
score[c] is the mean CI_c over every scoring image (classes pooled: CHIP ignores classes, unlike
feature entropy). Computed in float64 from one thin SVD per image, A = U·Σ·Vᵀ: with B = U·Σ
[C, k], k = min(C, m²), A and B without row c have the same singular values (Vᵀ has orthonormal
rows), so CI_c = Σσ(B) − Σσ(B without row c): C small SVDs of (C−1) × k instead of C + 1 of
C × m² (the reference's), about C²·k² operations per image. Rounding can leave a CI a hair below 0;
it is clamped to 0, and a dead unit (a zero row) scores exactly 0. Per-class sums are added in
class order, so chunks and shards give bit-identical scores.
"""

from __future__ import annotations

import torch

from scoring.activations import checked_activations
from scoring.base import ClassBatch
from scoring.chunked import PerClassSums
from scoring.registry import register

SVD_BATCH = 64
"""Rows removed at once (memory SVD_BATCH · C · k doubles)."""


def channel_independence(maps: torch.Tensor) -> torch.Tensor:
    """CI [C] ≥ 0 of one image's maps [C, m, m] (float64), as in the module doc."""
    c = maps.shape[0]
    a = maps.reshape(c, -1)
    u, sigma, _ = torch.linalg.svd(a, full_matrices=False)
    b = u * sigma  # [C, k]: A without row c and B without row c share their singular values
    keep = torch.arange(c).expand(c, c)[~torch.eye(c, dtype=torch.bool)].reshape(c, c - 1)
    without = torch.cat([torch.linalg.svdvals(b[rows]).sum(dim=-1) for rows in keep.split(SVD_BATCH)])
    ci = (sigma.sum() - without).clamp(min=0)
    return torch.where(a.abs().sum(dim=1) == 0, torch.zeros_like(ci), ci)


@register("chip", needs_data=True,
          description="channel independence: nuclear-norm drop when the unit's maps are zeroed, classes pooled "
          "(Sui et al. 2021, CHIP)")
class ChipScorer(PerClassSums):
    """score[c] = mean CI_c over the images; [C], higher = keep."""

    reads_only_units = True

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """Activations [n, C, m, m] → each image's CI [n, C] float64."""
        acts = checked_activations(self, batch)
        return torch.stack([channel_independence(image) for image in acts])
