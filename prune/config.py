"""The settings of one pruning run (frozen, keyword-only, type-checked when made;
`fingerprint` decides whether a run can resume)."""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from prune.errors import UsageError

ALLOCATIONS = ("uniform", "global", "sensitivity")
"""How a FLOPs or speed target is shared between layers (prune/pipeline/allocation.py)."""
MAX_LAYER_RATIO = 0.9
"""Default `--max-layer-ratio`: a target removes at most this fraction of one layer's channels."""
LAYER_BN_BATCHES = 5
"""Default training batches for re-estimating BatchNorm statistics after each layer's surgery."""


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """Everything that changes the result of `python -m prune` (see `--help`).

    Made with keywords only; a field of the wrong type is a UsageError naming it (an int is a
    float, a bool is not a number, numpy numbers become Python ones; `weights` and `data` also
    take an `os.PathLike`, kept as str).
    """

    model: str = "embedded"
    weights: str | None = None
    data: str | None = None
    ratio: float = 0.5
    """Fraction of channels removed at every prunable conv (unused when a target is given)."""
    target_flops: float | None = None
    """Keep this fraction of the unpruned FLOPs, in (0, 1), with per-layer ratios chosen by `allocation`."""
    target_speedup: float | None = None
    """Be this many times faster (img/s measured on `device`, > 1), per-layer ratios chosen by `allocation`."""
    allocation: str = "uniform"
    """How a target is shared between layers: uniform, global or sensitivity (prune/pipeline/allocation.py)."""
    max_layer_ratio: float = MAX_LAYER_RATIO
    """The largest fraction of one layer's channels a target may remove (at least one is kept)."""
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
    lr_schedule: str = "step"
    """"step": lr ÷10 after each epoch (the paper's); "cosine": linear warm-up, then cosine to 0."""
    distill: bool = False
    """Fine-tune with the unpruned network as teacher (`finetune.distillation`)."""
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    iterative_steps: int = 1
    """Reach the ratio (or target) in this many equal steps, each fine-tuned `step_epochs` epochs."""
    step_epochs: int = 1
    round_to: int = 1
    """Every pruned layer keeps a multiple of this many channels (torch-pruning's `round_to`)."""
    reinit: bool = False
    """Train the pruned architecture from fresh weights instead of fine-tuning (Scratch-E)."""
    train_images: int | None = None
    """Fine-tune on a fixed, class-balanced subset of this many training images (None: all)."""
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    input_size: int | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        for f in fields(self):
            value = getattr(self, f.name)
            check_type(f.name, value, FIELD_KINDS[f.name])
            if isinstance(value, numbers.Number) and not isinstance(value, bool):  # numpy scalars → int/float
                kind = int if "int" in FIELD_KINDS[f.name] and isinstance(value, numbers.Integral) else float
                object.__setattr__(self, f.name, kind(value))

    def as_dict(self) -> dict:
        """The settings as JSON-ready values (`scorer_options` as a dict)."""
        return {**asdict(self), "scorer_options": dict(self.scorer_options)}

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        """The settings of an `as_dict()` dict (report.json's "settings"); a field it lacks, written
        before the field existed, takes its default."""
        return cls(**{**d, "scorer_options": tuple(d.get("scorer_options", {}).items())})

    @property
    def trains(self) -> bool:
        """True when the run trains the network: from scratch (`reinit`), fine-tuning epochs, or
        fine-tuning between iterative steps."""
        between_steps = self.iterative_steps > 1 and self.step_epochs > 0
        return self.reinit or (self.finetune and (self.epochs > 0 or between_steps))

    @property
    def has_target(self) -> bool:
        """True when a FLOPs or speed target replaces `ratio`."""
        return self.target_flops is not None or self.target_speedup is not None

    def fingerprint(self) -> str:
        """Stable text of the settings that decide the result (device excluded; without a
        target the budget fields are left out, and recovery fields at their defaults, so a run
        keeps the fingerprint it had before those fields existed)."""
        d = self.as_dict()
        d.pop("device")
        if not self.has_target:
            for name in BUDGET_FIELDS:
                d.pop(name)
        for name in RECOVERY_FIELDS:
            if d[name] == getattr(DEFAULTS, name):
                d.pop(name)
        return json.dumps(d, sort_keys=True)


PATH_FIELDS = ("weights", "data")
BUDGET_FIELDS = ("target_flops", "target_speedup", "allocation", "max_layer_ratio")
RECOVERY_FIELDS = ("lr_schedule", "distill", "distill_alpha", "distill_temperature", "iterative_steps",
                   "step_epochs", "round_to", "reinit")
FIELD_KINDS: dict[str, tuple[str, ...]] = {
    "model": ("str",), "weights": ("str", "None"), "data": ("str", "None"), "ratio": ("float",),
    "target_flops": ("float", "None"), "target_speedup": ("float", "None"), "allocation": ("str",),
    "max_layer_ratio": ("float",),
    "scorer": ("str",), "scorer_options": ("options",), "classes": ("int", "None"), "samples_per_class": ("int",),
    "schedule": ("str",), "rounding": ("str",), "layer_bn_batches": ("int",), "bn_recalibration": ("int",),
    "finetune": ("bool",), "epochs": ("int",), "lr_schedule": ("str",), "distill": ("bool",),
    "distill_alpha": ("float",), "distill_temperature": ("float",), "iterative_steps": ("int",),
    "step_epochs": ("int",), "round_to": ("int",), "reinit": ("bool",), "train_images": ("int", "None"), "lr": ("float",),
    "momentum": ("float",), "weight_decay": ("float",), "batch_size": ("int",), "input_size": ("int", "None"),
    "device": ("str",), "seed": ("int",),
}
"""What each PruneConfig field takes: str, int (any integral number but bool, numpy's too),
float (any real number but bool; ranges are `validate`'s), bool, None, or options (a tuple of
(str, value) pairs)."""


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "options":
        return isinstance(value, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in value
        )
    return isinstance(value, str)


def check_type(name: str, value: Any, kinds: tuple[str, ...], owner: str = "PruneConfig") -> None:
    """UsageError unless `value` is one of `kinds` (see FIELD_KINDS); the message names `owner` and `name`."""
    if not any(_is_kind(value, kind) for kind in kinds):
        wanted = " or ".join("a tuple of (name, value) pairs" if k == "options" else k for k in kinds)
        shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
        raise UsageError(f"{owner} {name}={shown} ({type(value).__name__}) must be {wanted}")


DEFAULTS = PruneConfig()
"""The default settings (what `python -m prune` runs with no flags)."""
