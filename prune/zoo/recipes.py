"""The training recipes of the shipped embedded models (`prune.zoo.embedded_model.VARIANTS`).

A light module (no torch): the CLI and the pipeline read a model's recipe (`--reinit`'s
epochs, the report's words) without importing the training script `prune.zoo.train_embedded`
that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RECIPES", "TrainConfig", "training_recipe"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (defaults reproduce the shipped weights)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    seed: int = 0


RECIPES: dict[str, TrainConfig] = {
    "embedded": TrainConfig(),
    "embedded-plain": TrainConfig(epochs=20, batch_size=64, lr=0.015),
    "fashion": TrainConfig(epochs=12, batch_size=128, lr=0.05),
    "fashion-plain": TrainConfig(epochs=12, batch_size=64, lr=0.015),
    "fashion-resnet": TrainConfig(epochs=15, batch_size=128, lr=0.1),
}
"""The recipe that reproduces each shipped model (without BatchNorm: smaller batches and rate)."""


def training_recipe(model: str) -> TrainConfig | None:
    """The recipe the shipped `model` was trained with (None for any other model)."""
    return RECIPES.get(model)
