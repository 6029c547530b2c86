"""Layer and unit helpers shared by the unit experiments (`ablation`, `units`, `characterise`):
find a conv, collect its units for a class, score it, feature entropy per unit, the reference unit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import scoring
from prune import DataBundle, UsageError, class_images, collect_units


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(qualified name, module) of every Conv2d, in registration (≈ depth) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def find_conv(model: nn.Module, name: str | None) -> tuple[str, nn.Conv2d]:
    """The conv called `name`, or the last conv when `name` is None."""
    convs = conv_layers(model)
    if not convs:
        raise UsageError("the model has no Conv2d layer; pass a CNN")
    if name is None:
        return convs[-1]
    for n, m in convs:
        if n == name:
            return n, m
    raise UsageError(f"no conv layer {name!r}; choose one of {', '.join(n for n, _ in convs)}")


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of `module` inside `model`."""
    return next(n for n, m in model.named_modules() if m is module)


def class_batch(
    model: nn.Module, conv: nn.Conv2d, name: str, data: DataBundle, cls: int, n: int, *, seed: int, scale: float = 1.0
) -> scoring.ClassBatch:
    """Units [n, C, m, m] of `conv` for `n` training images of class `cls` (same choice as the main job)."""
    images = class_images(data, cls, n, seed=seed) * scale
    units = collect_units(model, conv, images, name=name)
    return scoring.ClassBatch(class_index=cls, images=images, activations=units)


def per_class_count(data: DataBundle, wanted: int) -> int:
    """`wanted`, lowered to the smallest class's number of training images."""
    counts = np.bincount(np.asarray(data.train_targets), minlength=len(data.classes))
    return int(min(wanted, counts.min()))


def refusal(scorer: scoring.Scorer, model: nn.Module, *, classes: int, samples_per_class: int) -> str | None:
    """Why `scorer` cannot score `model` (`Scorer.check`'s one line, e.g. tp-bnscale without
    BatchNorm), or None if it can."""
    try:
        scorer.check(model, classes=classes, samples_per_class=samples_per_class)
    except ValueError as e:
        return str(e)
    return None


def score_layer(
    scorer_name: str, model: nn.Module, conv: nn.Conv2d, name: str, batches: Sequence[scoring.ClassBatch], **options: Any
) -> torch.Tensor:
    """Scores [C] (higher = keep) of one layer with a registry scorer."""
    scorer = scoring.create(scorer_name, **options)
    layer = scoring.LayerSpec(model=model, conv=conv, name=name, example=batches[0].images[:1] if batches else None)
    return scorer(layer, batches if scorer.info.needs_data else ()).float()


def layer_entropy(acts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Units [N, C, m, m] → (feature entropy [C] in nats, selective rate ε [C]) over the N images."""
    from scoring.entropy import feature_entropy, selective_rate
    from scoring.topology import birth_times

    births = birth_times(acts).T  # [C, N]
    return feature_entropy(births), selective_rate(births)


def pick_unit(entropy: np.ndarray, rate: np.ndarray, *, min_rate: float = 0.5) -> int:
    """The reference unit: lowest feature entropy among units with ε ≥ `min_rate` (a unit
    with few births also has a low entropy, paper Eq. 9); among all units if none has."""
    ok = rate >= min_rate
    return int(np.argmin(np.where(ok, entropy, np.inf))) if ok.any() else int(np.argmin(entropy))
