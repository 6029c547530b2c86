"""Sensitivity curves: what the held-out loss and top-1 become when only one layer is pruned.

For each prunable group l, scored by the run's scorer on the unpruned network, and each ratio r
of RATIO_GRID, a copy of the model loses the lowest-scoring round(r·C_l) channels of group l
only (no fine-tuning; BatchNorm statistics re-estimated by `refit` when given, as the progressive
schedule does after each layer) and is evaluated on held-out images: at most HELDOUT_PER_CLASS
training images per class, disjoint from the run's scoring images and never from the val split the
report's accuracies come from (as NetAdapt holds out part of the training set). The network may
have been trained on them: the curves rank layers by how much pruning them costs, they do not
estimate test accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

import scoring
from finetune.metrics import Evaluation, evaluate
from prune.core import distributed
from prune.core.files import write_bytes, write_json
from prune.errors import UsageError
from prune.pipeline.allocation import RATIO_GRID
from prune.pipeline.selection import ScoringData, lowest, score_group
from prune.pipeline.surgery import Surgeon, channels_to_remove
from prune.zoo.data import DataBundle, heldout_indices, make_loader

HELDOUT_PER_CLASS = 50
"""At most this many held-out training images per class evaluate each pruned copy."""


@dataclass(frozen=True)
class SensitivityCurves:
    """loss[l][j] and top1[l][j]: the network with only group `layers[l]` pruned at `ratios[j]`,
    on `images` held-out images; `base_loss` / `base_top1`: the unpruned network on them."""

    layers: tuple[str, ...]
    ratios: tuple[float, ...]
    base_loss: float
    base_top1: float
    loss: tuple[tuple[float, ...], ...]
    top1: tuple[tuple[float, ...], ...]
    images: int

    def increase(self) -> list[list[float]]:
        """Loss increase over the unpruned network, [layer][ratio]."""
        return [[v - self.base_loss for v in row] for row in self.loss]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityCurves:
        return cls(**{**d, "layers": tuple(d["layers"]), "ratios": tuple(d["ratios"]),
                      "loss": tuple(map(tuple, d["loss"])), "top1": tuple(map(tuple, d["top1"]))})


def heldout(data: DataBundle, source: ScoringData | None, *, seed: int, per_class: int = HELDOUT_PER_CLASS) -> Subset:
    """At most `per_class` training images of each class, none of them one of `source`'s scoring
    images (`heldout_indices`; seed `seed`, the run's); never the val split the report evaluates on.
    UsageError if the scoring images leave none."""
    scored, n = ((), 0) if source is None else (tuple(source.classes), source.per_class)
    indices = heldout_indices(data, per_class, scored=scored, scored_per_class=n, seed=seed)
    if not indices:
        raise UsageError(f"--allocation sensitivity needs training images apart from the scoring images, but "
                         f"--samples-per-class {n} takes every training image; lower --samples-per-class")
    return Subset(data.train, indices)


def measure_curves(surgeon: Surgeon, scorer: scoring.Scorer, source: ScoringData | None, images: Dataset, *,
                   rounding: str = "round", round_to: int = 1, batch_size: int = 64, quiet: bool = True,
                   refit: Callable[[nn.Module], object] | None = None,
                   world: distributed.World = distributed.SINGLE) -> SensitivityCurves:
    """The curves of every group of `surgeon` (its model is left unpruned); `images`: held-out (image,
    label); `refit(model)`, if given, runs on each pruned copy before it is evaluated."""
    loader = make_loader(images, batch_size=batch_size, shuffle=False, seed=0)
    device = surgeon.example.device
    surgeon.model.eval()
    base = evaluate(surgeon.model, loader, device=device)
    loss, top1 = [], []
    for i, group in enumerate(tqdm(surgeon.groups, desc="sensitivity", disable=quiet)):
        scores = score_group(surgeon.model, group, scorer, source, world, example=surgeon.example)
        row: list[Evaluation] = []
        for r in RATIO_GRID:
            twin = surgeon.clone()
            n = channels_to_remove(group.num_channels, r, rule=rounding, blocks=group.blocks, round_to=round_to)
            twin.prune(twin.groups[i], twin.feasible(twin.groups[i], lowest(scores, n, blocks=group.blocks), scores))
            if refit is not None:
                refit(twin.model)
            row.append(evaluate(twin.model.eval(), loader, device=device))
        loss.append(tuple(e.loss for e in row))
        top1.append(tuple(e.top1 for e in row))
    return SensitivityCurves(layers=tuple(g.name for g in surgeon.groups), ratios=RATIO_GRID, base_loss=base.loss,
                             base_top1=base.top1, loss=tuple(loss), top1=tuple(top1), images=base.n)


def write_curves(out: Path, curves: SensitivityCurves) -> None:
    """`out`/sensitivity.json and `out`/sensitivity.png (loss increase and top-1 per layer against the ratio)."""
    import io

    from matplotlib.figure import Figure

    write_json(out / "sensitivity.json", curves.as_dict())
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_top1 = fig.subplots(1, 2)
    for name, inc, acc in zip(curves.layers, curves.increase(), curves.top1):
        ax_loss.plot(curves.ratios, inc, marker="o", label=name)
        ax_top1.plot(curves.ratios, acc, marker="o", label=name)
    ax_loss.set(xlabel="ratio (only this layer pruned)", ylabel="held-out loss increase")
    ax_top1.set(xlabel="ratio (only this layer pruned)", ylabel="held-out top-1")
    ax_top1.axhline(curves.base_top1, color="grey", linestyle=":", label="unpruned")
    ax_top1.legend(fontsize=7)
    fig.suptitle(f"Sensitivity on {curves.images} held-out images (no fine-tuning)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(out / "sensitivity.png", buf.getvalue())
