"""Birth times with the exact numba engine (see `scoring.topology._engine`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scoring.topology.maps import as_maps

CONVENTIONS = ("paper", "reference")
REFERENCE_MAX_DENSITY = 0.8  # reference convention: edge density cap
REFERENCE_MAX_BIRTH = 50  # reference convention: later births count as none


def _run_engine(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scoring.topology import _engine  # numba import/compile only when needed

    return _engine.births_batch(arr, _engine.num_threads())


def birth_thresholds(maps: Any) -> np.ndarray:
    """w* per map: the largest threshold at which β1 ≠ 0 (NaN = no birth).

    maps [..., m, m] → float64 [...]; the first cycle appears once every edge
    max(U[i, j], U[j, i]) ≥ w* is present.
    """
    arr, lead = as_maps(maps)
    return _run_engine(arr)[1].reshape(lead)


def _reference_births(arr: np.ndarray, wstar: np.ndarray) -> np.ndarray:
    """Steps over distinct symmetrised off-diagonal values, density cap, late = none."""
    m = arr.shape[-1]
    iu, ju = np.triu_indices(m, 1)
    out = np.zeros(arr.shape[0], np.int64)
    for k in np.flatnonzero(~np.isnan(wstar)):
        edges = np.maximum(arr[k][iu, ju], arr[k][ju, iu])
        density = np.count_nonzero(edges >= wstar[k]) / edges.size
        step = 1 + np.unique(edges[edges > wstar[k]]).size
        if density <= REFERENCE_MAX_DENSITY and step <= REFERENCE_MAX_BIRTH:
            out[k] = step
    return out


def birth_times(maps: Any, convention: str = "paper") -> np.ndarray:
    """Birth time of the first Betti curve of every map; 0 = no birth.

    maps: [..., m, m] numpy or torch (any float dtype, any device; copied to CPU).
    Returns int64 [...]. Exact for every finite input (ties, negative or constant maps);
    NaN/Inf raise ValueError.

    convention="paper" (default, DESIGN.md): rank all m² entries of U descending;
    b = 1 + #{entries > w*}, w* the largest threshold at which the clique complex of
    {i≠j : max(U[i,j], U[j,i]) ≥ w} has β1 ≠ 0 (GF(2)). Lower b = the pattern forms
    among fewer, stronger activations.

    convention="reference" (the authors' released code): the step counts distinct values
    of the symmetrised off-diagonal matrix, b = 1 + #{distinct values > w*}; a birth
    where the edge density exceeds 0.8 or with b > 50 counts as none.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    arr, lead = as_maps(maps)
    births, wstar = _run_engine(arr)
    if convention == "reference":
        births = _reference_births(arr, wstar)
    return births.reshape(lead)
