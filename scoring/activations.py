"""Activation-statistics scorers: `apoz` (Hu et al. 2016) and `selectivity` (Morcos et al. 2018).

Both stream: a class may come in chunks of images. apoz adds exact integer zero counts per
chunk; selectivity keeps each image's spatial means [n, C] and sums them when the class ends,
so the scores do not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scoring.base import ClassBatch, LayerSpec, Scorer
from scoring.chunked import PerClassSums
from scoring.registry import register


def checked_activations(scorer: Scorer, batch: ClassBatch) -> torch.Tensor:
    """`batch.activations` as [N, C, m, m] float64 CPU, after checking shape and finiteness."""
    layer: LayerSpec | None = getattr(scorer, "layer", None)
    if layer is None:
        raise ValueError(f"{scorer.info.name}: call reset(layer) before update()")
    acts = batch.activations.detach()
    if acts.ndim != 4 or acts.shape[1] != layer.num_channels or acts.shape[0] == 0:
        raise ValueError(
            f"{scorer.info.name}: activations must be [N>0, {layer.num_channels}, m, m] for "
            f"layer {layer.name!r}, got {list(acts.shape)}; pass the layer's post-ReLU output"
        )
    acts = acts.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(acts).all():
        raise ValueError(
            f"{scorer.info.name}: NaN/Inf activations at layer {layer.name!r}; "
            "check the model weights and input normalisation"
        )
    return acts


@register("apoz", needs_data=True, description="1 − average percentage of zeros (Hu et al. 2016)")
class APoZScorer(Scorer):
    """score[c] = 1 − APoZ[c]; [C], higher = keep (fewer zeros = more important).

    APoZ[c] = #{(image, position) : activation ≤ 0} / #(images × positions), counted over
    every class batch given (all classes pooled, as Hu et al. 2016). The counts are exact
    integers, so adding them chunk by chunk gives the same scores as whole classes.
    """

    reads_only_units = True

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._zeros = torch.zeros(layer.num_channels, dtype=torch.float64)
        self._total = 0

    def update(self, batch: ClassBatch) -> None:
        acts = checked_activations(self, batch)
        self._zeros += (acts <= 0).sum(dim=(0, 2, 3)).to(torch.float64)
        self._total += acts.shape[0] * acts.shape[2] * acts.shape[3]

    def state(self) -> tuple[torch.Tensor, int]:
        """(zero counts [C], number of activations per channel) seen so far."""
        return self._zeros.clone(), self._total

    def merge(self, states: Sequence[tuple[torch.Tensor, int]]) -> None:
        for zeros, total in states:
            self._zeros += zeros
            self._total += total

    def compute(self) -> torch.Tensor:
        if getattr(self, "_total", 0) == 0:
            raise ValueError("apoz: no activations seen; call update() with class batches")
        return (1.0 - self._zeros / self._total).float()


@register(
    "selectivity",
    needs_data=True,
    description="class selectivity index of the mean unit response (Morcos et al. 2018)",
)
class SelectivityScorer(PerClassSums):
    """score[c] = (μ_max − μ_rest) / (μ_max + μ_rest); [C], higher = keep.

    μ_k[c] = mean over class k's images of the mean over positions of unit c; μ_max is the
    largest class mean, μ_rest the mean of the other classes' means. 0/0 (a unit silent on
    every class) gives 0. Needs at least two classes (ValueError otherwise). Batches with the
    same class index are pooled. Selective units (1 = responds to one class only) are kept.
    """

    reads_only_units = True

    def check(self, model: nn.Module, *, classes: int, samples_per_class: int) -> None:
        if classes < 2:
            raise ValueError(f"scorer 'selectivity' compares classes and needs at least 2, got {classes}; "
                             "pass --classes 2 or more, or choose another --scorer")

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """Activations [n, C, m, m] → each image's spatial mean per unit [n, C] float64."""
        return checked_activations(self, batch).mean(dim=(2, 3))

    def compute(self) -> torch.Tensor:
        self.end_class()
        sums = getattr(self, "_sums", {})
        if len(sums) < 2:
            raise ValueError(
                f"selectivity: needs batches of at least 2 classes, got {len(sums)}; "
                "score with more classes or choose another scorer"
            )
        means = torch.stack([sums[k] / self._counts[k] for k in sorted(sums)])  # [K, C]
        return selectivity_index(means).float()


def selectivity_index(means: torch.Tensor) -> torch.Tensor:
    """Class selectivity from class means [K, C] (K ≥ 2) → [C]; 0/0 → 0."""
    num_classes = means.shape[0]
    mu_max = means.max(dim=0).values
    mu_rest = (means.sum(dim=0) - mu_max) / (num_classes - 1)
    num = mu_max - mu_rest
    den = mu_max + mu_rest
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.zeros_like(num))
