"""The settings of one pruning run (frozen; `fingerprint` decides whether a run can resume)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

LAYER_BN_BATCHES = 5
"""Default training batches for re-estimating BatchNorm statistics after each layer's surgery."""


@dataclass(frozen=True)
class PruneConfig:
    """Everything that changes the result of `python -m prune` (see `--help`)."""

    model: str = "embedded"
    weights: str | None = None
    data: str | None = None
    ratio: float = 0.5
    scorer: str = "entropy"
    scorer_options: tuple[tuple[str, Any], ...] = ()
    classes: int | None = None
    samples_per_class: int = 100
    schedule: str = "progressive"
    rounding: str = "round"
    layer_bn_batches: int = LAYER_BN_BATCHES
    bn_recalibration: int = 0
    finetune: bool = True
    epochs: int = 3
    train_images: int | None = None
    """Fine-tune on a fixed, class-balanced subset of this many training images (None: all)."""
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    input_size: int | None = None
    device: str = "cpu"
    seed: int = 0

    def as_dict(self) -> dict:
        """The settings as JSON-ready values (`scorer_options` as a dict)."""
        return {**asdict(self), "scorer_options": dict(self.scorer_options)}

    def fingerprint(self) -> str:
        """Stable text of the settings that decide the result (device excluded)."""
        d = self.as_dict()
        d.pop("device")
        return json.dumps(d, sort_keys=True)
