"""Full-persistence characterisations with gudhi (slow: seconds per map at m = 224).

Used as the reference for the fast engine and for paper Table 5 (maximum and integral of
the Betti curve) and A.2 (cubical complexes). All homology is over GF(2); intervals of
zero length (a cycle created and filled at the same threshold) never count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scoring.topology.maps import as_maps


def _one_map(map_: Any) -> np.ndarray:
    arr, lead = as_maps(map_)
    if lead:
        raise ValueError(f"expected one m×m map; got leading shape {lead}, pass map[k]")
    return arr[0].astype(np.float64)


def _birth_from_value(U: np.ndarray, wstar: float | None) -> int:
    """Paper step of threshold w*: 1 + #{entries of U > w*}; 0 when w* is None."""
    return 0 if wstar is None else 1 + int(np.count_nonzero(U > wstar))


def _clique_h1(U: np.ndarray) -> np.ndarray:
    """H1 intervals [k, 2] of the flag filtration in filtration units (value −w)."""
    import gudhi

    m = U.shape[0]
    if m < 2:
        return np.zeros((0, 2))
    filt = -np.maximum(U, U.T)
    np.fill_diagonal(filt, -float(np.abs(U).max()) - 1.0)
    st = gudhi.SimplexTree.create_from_array(filt)
    st.expansion(2)
    st.persistence(homology_coeff_field=2, persistence_dim_max=True)
    return np.asarray(st.persistence_intervals_in_dimension(1), dtype=np.float64).reshape(-1, 2)


def gudhi_birth_time(map_: Any) -> int:
    """Paper-convention birth time of one map [m, m] with gudhi (reference; slow).

    SimplexTree: vertices below every edge (−max|U| − 1), edge {i, j} at
    −max(U[i, j], U[j, i]), expansion(2), persistence over GF(2) with
    persistence_dim_max=True. The earliest H1 birth is −w*; b = 1 + #{entries > w*}.
    """
    U = _one_map(map_)
    h1 = _clique_h1(U)
    return _birth_from_value(U, -float(h1[:, 0].min()) if len(h1) else None)


def betti1_curve(map_: Any) -> np.ndarray:
    """β1(X(v)) for v = 1..m² of the paper filtration of one map [m, m] → int64 [m²].

    Slow (full gudhi persistence). Step v uses threshold a(v), the v-th largest entry.
    """
    U = _one_map(map_)
    h1 = _clique_h1(U)
    f = -np.sort(U, axis=None)[::-1]  # filtration value of each step, ascending
    born = np.searchsorted(np.sort(h1[:, 0]), f, side="right")
    dead = np.searchsorted(np.sort(h1[:, 1]), f, side="right")
    return (born - dead).astype(np.int64)


def betti1_max(map_: Any) -> int:
    """Maximum of the first Betti curve of one map [m, m] (paper Table 5; slow)."""
    return int(betti1_curve(map_).max(initial=0))


def betti1_integral(map_: Any) -> int:
    """Sum of β1 over the m² steps of one map [m, m] (paper Table 5; slow)."""
    return int(betti1_curve(map_).sum())


def cubical_birth_times(maps: Any) -> np.ndarray:
    """Birth times from cubical complexes (paper A.2): maps [..., m, m] → int64 [...].

    Each map is a cubical complex whose pixels enter in the sublevel filtration of −U
    (brightest first); w* is minus the earliest H1 birth and b = 1 + #{entries > w*}, the
    same "step" as the paper convention; 0 = no birth. Slow (gudhi, one map at a time).
    """
    import gudhi

    arr, lead = as_maps(maps)
    out = np.zeros(arr.shape[0], np.int64)
    for k, U in enumerate(arr.astype(np.float64)):
        cc = gudhi.CubicalComplex(top_dimensional_cells=-U)
        cc.persistence(homology_coeff_field=2)
        h1 = np.asarray(cc.persistence_intervals_in_dimension(1)).reshape(-1, 2)
        out[k] = _birth_from_value(U, -float(h1[:, 0].min()) if len(h1) else None)
    return out.reshape(lead)
