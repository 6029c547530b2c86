"""The record of an images-per-second measurement (written by `prune.pipeline.speed`, read by reports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Throughput:
    """img_per_s: the median over `windows` timed windows (of `iters // windows` batches each) after
    `warmup` batches; `spread`: the slowest and the fastest window's img/s; `seconds`: the time budget
    the windows were timed to (`prune.pipeline.speed.measure_throughput`). Records written before
    windows existed hold one window of `iters` batches and no spread."""

    img_per_s: float
    device: str
    batch_size: int
    dtype: str
    threads: int
    warmup: int
    iters: int
    channels_last: bool
    windows: int = 1
    spread: tuple[float, float] | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.spread is not None:  # read back from JSON as a list
            object.__setattr__(self, "spread", tuple(self.spread))

    def as_dict(self) -> dict:
        """The fields as report.json's "throughput" holds them (`spread` as a list)."""
        d = asdict(self)
        d["spread"] = None if self.spread is None else list(self.spread)
        return d
