"""Control scorer: `random`, seeded uniform scores (a baseline any criterion should beat)."""

from __future__ import annotations

import zlib

import torch

from scoring.base import LayerSpec, Scorer
from scoring.registry import register


def layer_seed(seed: int, name: str) -> int:
    """A stable 32-bit seed, CRC-32 of "seed/name"; the same on every run and platform.

    (torch's CPU generator uses only the low 32 bits of its seed, so mix before seeding.)
    """
    return zlib.crc32(f"{int(seed)}/{name}".encode("utf-8"))


@register("random", needs_data=False, description="seeded uniform random scores (control)")
class RandomScorer(Scorer):
    """score[c] ~ U[0, 1) from a generator seeded by (seed, layer.name); [C], higher = keep.

    Options: seed (int, default 0). Deterministic per layer and seed, independent of the
    global RNG and of the order in which layers are scored.
    """

    def __init__(self, *, seed: int = 0) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"random: seed must be a non-negative int, got {seed!r}")
        self.seed = seed

    def compute(self) -> torch.Tensor:
        layer: LayerSpec | None = getattr(self, "layer", None)
        if layer is None:
            raise ValueError("random: call reset(layer) before compute()")
        generator = torch.Generator().manual_seed(layer_seed(self.seed, layer.name))
        return torch.rand(layer.num_channels, generator=generator, dtype=torch.float32)
