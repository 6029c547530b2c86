"""Birth times of units (paper §3.1) and other topological characterisations.

Fast exact engine (numba, compiled on first call):

- :func:`birth_times` — birth time b(U) of the first Betti curve for every map,
  0 = no birth, higher = the cycle appears later in the filtration.
- :func:`birth_thresholds` — the activation value w* at which the first cycle appears.
- ``CONVENTIONS`` — ("paper", "authors"): how w* is turned into a step (see
  :mod:`scoring.topology.births`); :func:`resolve_convention` checks a name ("reference" is
  a deprecated alias of "authors").

Slow full-persistence tools (gudhi), for tests, benchmarks and paper Table 5 / A.2:
:func:`gudhi_birth_time`, :func:`betti1_curve`, :func:`betti1_max`,
:func:`betti1_integral`, :func:`cubical_birth_times`.
"""

from __future__ import annotations

from scoring.topology.births import (
    AUTHORS_MAX_BIRTH,
    CONVENTIONS,
    authors_step_limit,
    birth_thresholds,
    birth_times,
    resolve_convention,
)
from scoring.topology.maps import as_maps
from scoring.topology.persistence import (
    betti1_curve,
    betti1_integral,
    betti1_max,
    cubical_birth_times,
    gudhi_birth_time,
)

__all__ = [
    "AUTHORS_MAX_BIRTH",
    "CONVENTIONS",
    "as_maps",
    "authors_step_limit",
    "betti1_curve",
    "betti1_integral",
    "betti1_max",
    "birth_thresholds",
    "birth_times",
    "cubical_birth_times",
    "gudhi_birth_time",
    "resolve_convention",
]
