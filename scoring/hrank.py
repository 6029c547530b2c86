"""HRank (Lin et al., CVPR 2020): a channel whose feature maps have a high matrix rank carries
more information; keep it.

score[c] = mean over every scoring image (all classes pooled: HRank ignores classes, unlike
feature entropy, which is per class) of rank(map of channel c) [m, m], the post-activation map.
Singular values are computed in float64 and counted above `torch.linalg.matrix_rank`'s default
tolerance for the activations' own dtype, σ_max · m · ε (float32 maps, as the reference
`torch.matrix_rank` sees them: ε = 2^-23): float64's tolerance would count the float32 rounding of
a rank-1 map as rank, and float32 arithmetic can misjudge a singular value near the tolerance. A
dead unit (maps all zero) has rank 0, the lowest. Ranks are integers, so their per-class sums are exact whatever the chunking
or sharding.
"""

from __future__ import annotations

import torch

from scoring.activations import checked_activations
from scoring.base import ClassBatch
from scoring.chunked import PerClassSums
from scoring.registry import register


@register("hrank", needs_data=True,
          description="mean matrix rank of the unit's maps, classes pooled (Lin et al. 2020, HRank)")
class HRankScorer(PerClassSums):
    """score[c] = mean rank of unit c's [m, m] maps over the images; [C], higher = keep."""

    reads_only_units = True

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """Activations [n, C, m, m] → each map's rank [n, C] float64."""
        acts = checked_activations(self, batch)
        dtype = batch.activations.dtype if batch.activations.is_floating_point() else torch.float64
        tolerance = max(acts.shape[-2:]) * torch.finfo(dtype).eps
        return torch.linalg.matrix_rank(acts, rtol=tolerance).to(torch.float64)
