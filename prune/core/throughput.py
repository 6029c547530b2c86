"""The record of an images-per-second measurement (written by `prune.pipeline.speed`, read by reports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Throughput:
    """img_per_s measured over `iters` batches after `warmup` batches."""

    img_per_s: float
    device: str
    batch_size: int
    dtype: str
    threads: int
    warmup: int
    iters: int
    channels_last: bool

    def as_dict(self) -> dict:
        """The fields as report.json's "throughput" holds them."""
        return asdict(self)
