"""What `benchmarks.criteria` measures: its settings and presets (a module of their own, so that the
criteria benchmark and its map-size study both import them without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, Testbed
from benchmarks.compare import ARMS, EXTRA_ARMS

SHIPPED: tuple[str, ...] = ("embedded", "embedded-plain", "fashion", "fashion-plain")
"""The testbeds the project ships (default)."""


@dataclass(frozen=True)
class Settings:
    """What the criteria benchmark measures (frozen; `full` and `quick` presets below)."""

    testbeds: tuple[str, ...] = SHIPPED
    arms: tuple[str, ...] = tuple(a.name for a in ARMS + EXTRA_ARMS)
    samples_per_class: int = 100
    oracle_per_class: int = 100
    ratio: float = 0.5
    bootstrap: int = 20
    random_draws: int = 200
    n_study: tuple[int, ...] = (25, 50, 100, 200)
    """Images per class of the N study (`--n-study TESTBED`); split-half needs 2N per class."""
    n_study_arms: tuple[str, ...] = ("entropy", "entropy-authors", "l1", "tp-taylor")
    map_sizes: tuple[int, ...] = (32, 64, 96)
    """Input sides of the map-size study (`--map-size-study`, benchmarks/criteria_map_size.py)."""
    map_size_arms: tuple[str, ...] = ("entropy", "entropy-authors", "hrank", "chip", "thinet", "l1", "tp-taylor")
    """The arms of the map-size study: the feature-map family (entropy, HRank, CHIP, ThiNet) and two references."""
    seed: int = 0
    threads: int | None = None
    quick: bool = False
    """Embedded data shrunk as every experiment's --quick does."""
    quiet: bool = False
    results: Path = RESULTS
    name: str = "criteria"
    custom: Testbed | None = None
    """The `--model/--weights/--data/--input-size` network, when given (then the only testbed)."""

    @property
    def runs_dir(self) -> Path:
        return self.results / self.name


PRESETS = {
    "full": Settings(),
    "quick": Settings(testbeds=("embedded",), arms=("entropy", "l1", "random"), samples_per_class=4,
                      oracle_per_class=6, bootstrap=3, random_draws=5, n_study=(2, 4), n_study_arms=("entropy", "l1"),
                      map_sizes=(32, 40), map_size_arms=("entropy", "l1"), threads=1, quick=True, quiet=True,
                      name="criteria-quick"),
}
