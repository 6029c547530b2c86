"""HRank (Lin et al., CVPR 2020): a channel whose feature maps have a high matrix rank carries
more information; keep it.

score[c] = mean over every scoring image (all classes pooled: HRank ignores classes, unlike
feature entropy, which is per class) of rank(map of channel c) [m, m], the post-activation map.
Ranks are computed in float64 with `torch.linalg.matrix_rank`'s default tolerance (singular
values above σ_max · max(m, m) · ε_float64 count), as the reference `torch.matrix_rank` does in
its dtype: float32 would count fewer (its ε is 2^29 times larger). A dead unit (maps all zero) has
rank 0, the lowest. Ranks are integers, so their per-class sums are exact whatever the chunking
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

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """Activations [n, C, m, m] → each map's rank [n, C] float64."""
        return torch.linalg.matrix_rank(checked_activations(self, batch)).to(torch.float64)

    def compute(self) -> torch.Tensor:
        return self.pooled_mean().float()
