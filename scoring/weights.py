"""Weight-only scorers: `l1` (Li et al. 2016) and `fpgm` (He et al. 2019).

Both read only `layer.conv.weight` ([C, C_in/groups, k, k]); they need no data.
"""

from __future__ import annotations

import torch

from scoring.base import LayerSpec, Scorer
from scoring.registry import register


def _filters(scorer: Scorer) -> torch.Tensor:
    """The layer's filters flattened to [C, D], float64 on CPU."""
    layer: LayerSpec | None = getattr(scorer, "layer", None)
    if layer is None:
        raise ValueError(f"{scorer.info.name}: call reset(layer) before compute()")
    weight = layer.conv.weight.detach()
    return weight.reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float64)


@register("l1", needs_data=False, description="L1 norm of each output filter (Li et al. 2016)")
class L1Scorer(Scorer):
    """score[c] = Σ |W[c]| over the filter's weights, bias excluded; [C], higher = keep."""

    def compute(self) -> torch.Tensor:
        return _filters(self).abs().sum(dim=1).float()


def pairwise_distance_sums(filters: torch.Tensor, *, chunk: int = 8) -> torch.Tensor:
    """g[i] = Σ_j ||F_i − F_j||_2 for filters [C, D] → [C] (paper Eq. 13, not squared).

    Exact differences (no ||a||² + ||b||² − 2ab shortcut), `chunk` rows at a time so memory
    stays at [chunk, C, D].
    """
    sums = [
        torch.linalg.vector_norm(rows.unsqueeze(1) - filters.unsqueeze(0), dim=2).sum(dim=1)
        for rows in filters.split(chunk)
    ]
    return torch.cat(sums)


@register(
    "fpgm",
    needs_data=False,
    description="distance to the other filters, geometric-median criterion (He et al. 2019)",
)
class FPGMScorer(Scorer):
    """score[i] = Σ_j ||F_i − F_j||_2 on the raw flattened filters; [C], higher = keep.

    A filter close to all others (small sum, near the geometric median) is redundant, so the
    sum itself is the score.
    """

    def compute(self) -> torch.Tensor:
        return pairwise_distance_sums(_filters(self)).float()
