"""Birth times of units (paper §3.1) and other topological characterisations.

Fast exact engine (numba, compiled on first call):

- :func:`birth_times` — birth time b(U) of the first Betti curve for every map,
  0 = no birth, higher = the cycle appears later in the filtration.
- :func:`birth_thresholds` — the activation value w* at which the first cycle appears.

Slow full-persistence tools (gudhi), for tests, benchmarks and paper Table 5 / A.2:
:func:`gudhi_birth_time`, :func:`betti1_curve`, :func:`betti1_max`,
:func:`betti1_integral`, :func:`cubical_birth_times`.
"""

from __future__ import annotations

from scoring.topology.maps import as_maps
from scoring.topology.births import CONVENTIONS, birth_thresholds, birth_times
from scoring.topology.persistence import (
    betti1_curve,
    betti1_integral,
    betti1_max,
    cubical_birth_times,
    gudhi_birth_time,
)

__all__ = [
    "CONVENTIONS",
    "as_maps",
    "betti1_curve",
    "betti1_integral",
    "betti1_max",
    "birth_thresholds",
    "birth_times",
    "cubical_birth_times",
    "gudhi_birth_time",
]
