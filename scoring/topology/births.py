"""Birth times with the exact numba engine (see `scoring.topology._engine`).

Two conventions number the same filtration differently; both read the threshold w* (the
largest value w at which the clique complex of {i≠j : max(U[i, j], U[j, i]) ≥ w} has
β1 ≠ 0 over GF(2)) from the engine:

- "paper" (default, docs/definitions.md "Birth time"): b = 1 + #{entries of U > w*}, the rank over all
  m² entries, diagonal included.
- "authors" (the authors' released code, docs/definitions.md "Authors' code convention"):
  b = #{distinct off-diagonal values of max(U, Uᵀ) > w*}, i.e. t* − 1 for the step t* at
  which the first cycle appears; none when b = 0, b > 50 or t* > ⌈0.8·C(m, 2)⌉.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from scoring.topology.maps import as_maps

CONVENTIONS = ("paper", "authors")
DEPRECATED_CONVENTIONS = {"reference": "authors"}  # old name → current name
AUTHORS_MAX_BIRTH = 50  # authors' convention: a later birth counts as none
_CHUNK_ENTRIES = 1 << 22  # off-diagonal values materialised at once (authors' counting)


def resolve_convention(convention: Any, *, stacklevel: int = 2) -> str:
    """The canonical name of a birth/entropy convention: "paper" or "authors".

    "reference" (the former name of "authors") still works: it emits one FutureWarning
    (visible to end users by default) and resolves to "authors". Anything else raises
    ValueError. `stacklevel` counts from the caller of this function, as in warnings.warn.
    """
    if isinstance(convention, str) and convention in DEPRECATED_CONVENTIONS:
        new = DEPRECATED_CONVENTIONS[convention]
        warnings.warn(
            f"convention {convention!r} is deprecated and now means {new!r}; "
            f"pass convention={new!r}",
            FutureWarning,
            stacklevel=stacklevel + 1,
        )
        return new
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise ValueError(
            f"unknown convention {convention!r}; use one of {CONVENTIONS} "
            "('paper' is the default)"
        )
    return convention


def authors_step_limit(m: int) -> int:
    """T = ⌈0.8·C(m, 2)⌉: the last step the authors' convention tracks (exact integers)."""
    pairs = m * (m - 1) // 2
    return -(-4 * pairs // 5)


def _run_engine(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import scoring.topology._engine as _engine  # numba import/compile only when needed

    return _engine.births_batch(arr, _engine.num_threads())


def birth_thresholds(maps: Any) -> np.ndarray:
    """w* per map: the largest threshold at which β1 ≠ 0 (NaN = no birth).

    maps [..., m, m] → float64 [...]; the first cycle appears once every edge
    max(U[i, j], U[j, i]) ≥ w* is present.
    """
    arr, lead = as_maps(maps)
    return _run_engine(arr)[1].reshape(lead)


def _distinct_above(maps: np.ndarray, wstar: np.ndarray) -> np.ndarray:
    """#{distinct off-diagonal values of max(U, Uᵀ) > w*} per map.

    maps [B, m, m], wstar float64 [B] (finite) → int64 [B]. Vectorised: the values above
    w* of all maps are sorted together by (map, value) and the runs counted.
    """
    m = maps.shape[-1]
    upper = np.triu(np.ones((m, m), bool), 1)
    step = max(1, _CHUNK_ENTRIES // (m * m))
    out = np.zeros(maps.shape[0], np.int64)
    for a in range(0, maps.shape[0], step):
        chunk = maps[a : a + step]
        big = chunk > wstar[a : a + step, None, None]  # max(U, Uᵀ) > w* iff either is
        flat = np.flatnonzero((big | big.transpose(0, 2, 1)) & upper)
        rows, i, j = flat // (m * m), flat % (m * m) // m, flat % m
        vals = np.maximum(chunk[rows, i, j], chunk[rows, j, i])
        order = np.lexsort((vals, rows))
        rows, vals = rows[order], vals[order]
        first = np.ones(rows.size, bool)
        first[1:] = (rows[1:] != rows[:-1]) | (vals[1:] != vals[:-1])
        out[a : a + step] = np.bincount(rows[first], minlength=chunk.shape[0])
    return out


def _authors_births(arr: np.ndarray, wstar: np.ndarray) -> np.ndarray:
    """Authors' births from the engine's w*: arr [B, m, m], wstar [B] → int64 [B], 0 = none.

    Step t ≥ 1 adds the pairs whose max(U, Uᵀ) equals the t-th largest distinct value, so
    the complex at step t is the one at threshold w = that value: t* = 1 + #{distinct > w*},
    b = t* − 1. None when b = 0 (t* = 1), b > 50 or t* > T.
    """
    out = np.zeros(arr.shape[0], np.int64)
    born = np.flatnonzero(~np.isnan(wstar))
    if born.size == 0:
        return out
    b = _distinct_above(arr[born], wstar[born])
    limit = authors_step_limit(arr.shape[-1])
    keep = (b >= 1) & (b <= AUTHORS_MAX_BIRTH) & (b + 1 <= limit)
    out[born] = np.where(keep, b, 0)
    return out


def birth_times(maps: Any, convention: str = "paper") -> np.ndarray:
    """Birth time of the first Betti curve of every map; 0 = no birth.

    maps: [..., m, m] numpy or torch (any float dtype, any device; copied to CPU).
    Returns int64 [...]. Exact for every finite input (ties, negative or constant maps);
    NaN/Inf raise ValueError. Lower b = the pattern forms among fewer, stronger activations.

    convention="paper" (default, docs/definitions.md): rank all m² entries of U descending (the
    diagonal counts in the ranking, never as an edge); b = 1 + #{entries > w*}, w* the
    largest threshold at which the clique complex of {i≠j : max(U[i,j], U[j,i]) ≥ w} has
    β1 ≠ 0 (GF(2)).

    convention="authors" (the authors' released code): S = max(U, Uᵀ) with a +∞ diagonal
    (step 0, no edge); its distinct values sorted descending are steps 0, 1, 2, … and each
    off-diagonal pair enters at the step of its value; steps above T = ⌈0.8·C(m, 2)⌉ never
    enter. With t* the first step where β1 ≠ 0, b = t* − 1 = #{distinct off-diagonal S
    values > w*}; b = 0 (a tied block that enters at step 1 with a cycle), b > 50 or
    t* > T count as no birth (0). "reference" is a deprecated alias (FutureWarning).
    """
    convention = resolve_convention(convention, stacklevel=2)
    arr, lead = as_maps(maps)
    births, wstar = _run_engine(arr)
    if convention == "authors":
        births = _authors_births(arr, wstar)
    return births.reshape(lead)
