"""Numba kernels of the exact birth-time engine (paper convention).

Nothing is compiled at import: the kernels compile on their first call and are cached on
disk (``cache=True``). Entry point: :func:`births_batch`.

Per map U (m×m) the engine sweeps the symmetrised off-diagonal edges {i, j} with weight
max(U[i, j], U[j, i]) in descending order, block by block (a block = edges of equal
weight), keeping a union-find over the vertices and one neighbour bitset per vertex.
While β1 = 0, one new edge {u, w} makes β1 ≠ 0 iff u and w are already connected and have
no common neighbour (Mayer–Vietoris). A tied block is decided exactly: its edges that join
components or close a triangle are added greedily (each keeps β1 = 0); the k edges left R
all lie inside components, so β1 after the block = dim H1(X ∪ R, X) = k − rank ∂2|R over
GF(2), where ∂2|R maps every new triangle to its R-edges.

Only the top of the edge list is materialised: a threshold t, read off a strided sample
of U's entries so that about 2m entries lie above it, selects every edge of weight ≥ t
(tied blocks are therefore always complete) into a max-heap; if no birth is found the
sweep goes on below t with a lower threshold (twice as many entries), and small maps take
all their edges at once. At a birth, b = 1 + #{entries of U > w*} is one pass over U.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

_ONE = np.uint64(1)
_SMALL_N = 100  # at most this many edges: collect them all at once
_MAX_SAMPLE = 128  # entries sampled to choose the selection threshold
_ENTRIES_PER_THREAD = 200_000  # smaller batches run on one thread


@njit(cache=True, nogil=True)
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True, nogil=True)
def _set_edge(adj: np.ndarray, u: int, w: int) -> None:
    adj[u, w >> 6] |= _ONE << np.uint64(w & 63)
    adj[w, u >> 6] |= _ONE << np.uint64(u & 63)


@njit(cache=True, nogil=True)
def _try_add(parent: np.ndarray, adj: np.ndarray, u: int, w: int) -> bool:
    """Add edge {u, w} if it keeps β1 = 0 (joins components or closes a triangle)."""
    ru = _find(parent, u)
    rw = _find(parent, w)
    if ru != rw:
        parent[ru] = rw
        _set_edge(adj, u, w)
        return True
    for k in range(adj.shape[1]):
        if adj[u, k] & adj[w, k]:
            _set_edge(adj, u, w)
            return True
    return False


@njit(cache=True, nogil=True)
def _lowest_bit(x: np.uint64) -> int:
    i = 0
    while (x & _ONE) == 0:
        x >>= _ONE
        i += 1
    return i


@njit(cache=True, nogil=True)
def _insert(basis: np.ndarray, has: np.ndarray, vec: np.ndarray) -> int:
    """Reduce `vec` against the GF(2) echelon `basis`; 1 if it was independent."""
    nwords = vec.shape[0]
    while True:
        p = -1
        for k in range(nwords):
            if vec[k] != 0:
                p = 64 * k + _lowest_bit(vec[k])
                break
        if p < 0:
            return 0
        if not has[p]:
            basis[p, :] = vec
            has[p] = True
            return 1
        for k in range(nwords):
            vec[k] ^= basis[p, k]


@njit(cache=True, nogil=True)
def _stuck_edges_leave_cycle(
    pend: np.ndarray, npend: int, eu: np.ndarray, ev: np.ndarray, adj: np.ndarray,
    ridx: np.ndarray, m: int,
) -> bool:
    """β1 ≠ 0 after adding the stuck edges pend[:npend] (all inside components)?"""
    for q in range(npend):
        e = pend[q]
        _set_edge(adj, eu[e], ev[e])
        ridx[eu[e] * m + ev[e]] = q
        ridx[ev[e] * m + eu[e]] = q
    nwords = (npend + 63) >> 6
    basis = np.zeros((npend, nwords), np.uint64)
    has = np.zeros(npend, np.bool_)
    vec = np.zeros(nwords, np.uint64)
    rank = 0
    for q in range(npend):
        if rank == npend:
            break
        u = eu[pend[q]]
        w = ev[pend[q]]
        for k in range(adj.shape[1]):
            common = adj[u, k] & adj[w, k]
            while common != 0 and rank < npend:
                x = 64 * k + _lowest_bit(common)
                common &= common - _ONE
                vec[:] = 0
                for r in (q, ridx[u * m + x], ridx[w * m + x]):
                    if r >= 0:
                        vec[r >> 6] ^= _ONE << np.uint64(r & 63)
                rank += _insert(basis, has, vec)
    for q in range(npend):
        e = pend[q]
        ridx[eu[e] * m + ev[e]] = -1
        ridx[ev[e] * m + eu[e]] = -1
    return rank < npend


@njit(cache=True, nogil=True)
def _block_has_cycle(
    bu: np.ndarray, bv: np.ndarray, size: int, npresent: int, nedges: int,
    parent: np.ndarray, adj: np.ndarray, pend: np.ndarray, ridx: np.ndarray, m: int,
) -> bool:
    """Add the tied block {bu[k], bv[k]}, k < size (β1 = 0 before); β1 ≠ 0 after it?"""
    if npresent + size == nedges:
        return False  # the graph becomes complete: a simplex, β1 = 0
    npend = 0
    for q in range(size):
        if not _try_add(parent, adj, bu[q], bv[q]):
            pend[npend] = q
            npend += 1
    if npend == 0:
        return False
    if size == 1:
        return True
    progress = True
    while progress and npend > 0:
        progress = False
        kept = 0
        for q in range(npend):
            e = pend[q]
            if _try_add(parent, adj, bu[e], bv[e]):
                progress = True
            else:
                pend[kept] = e
                kept += 1
        npend = kept
    if npend == 0:
        return False
    if npend == 1:
        return True
    return _stuck_edges_leave_cycle(pend, npend, bu, bv, adj, ridx, m)


@njit(cache=True, nogil=True)
def _sift_down(keys: np.ndarray, ids: np.ndarray, i: int, size: int) -> None:
    """Restore the max-heap keys[:size] below position i (ids move along)."""
    key = keys[i]
    ident = ids[i]
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and keys[c + 1] > keys[c]:
            c += 1
        if keys[c] <= key:
            break
        keys[i] = keys[c]
        ids[i] = ids[c]
        i = c
    keys[i] = key
    ids[i] = ident


@njit(cache=True, nogil=True)
def _sample_entries(U: np.ndarray, out: np.ndarray) -> int:
    """Fill out[:s] with a strided sample of U's entries (sequential access); returns s
    (0 for small maps: then every edge is taken at once)."""
    m = U.shape[0]
    if m * (m - 1) // 2 <= _SMALL_N:
        return 0
    size = m * m
    s = min(out.shape[0], max(16, size // 8))
    step = max(1, size // s)
    while np.gcd(step, m) != 1:
        step += 1
    for r in range(s):
        k = (r * step + step // 2) % size
        out[r] = U[k // m, k % m]
    return s


@njit(cache=True, nogil=True)
def _threshold(
    sample: np.ndarray, s: int, target: int, m: int, hi: float, top: np.ndarray
) -> float:
    """Value t with about 2·target entries (so ≥ target edges) of U in [t, hi): a rank of
    the sample below hi, found by insertion into `top`; −inf takes every edge left."""
    if s == 0 or 4 * target >= m * (m - 1):
        return -np.inf
    r = (2 * target * s) // (m * m)
    filled = 0
    for q in range(s):
        v = sample[q]
        if v >= hi:
            continue
        if filled <= r:
            p = filled
            filled += 1
        elif v > top[r]:
            p = r
        else:
            continue
        while p > 0 and top[p - 1] < v:
            top[p] = top[p - 1]
            p -= 1
        top[p] = v
    return top[r] if filled > r else -np.inf


@njit(cache=True, nogil=True)
def _collect_all(U: np.ndarray, hi: float, hk: np.ndarray, hid: np.ndarray) -> int:
    """Every edge with weight < hi into (hk, hid); returns their number."""
    m = U.shape[0]
    size = 0
    for i in range(m):
        for j in range(i + 1, m):
            e = max(U[i, j], U[j, i])
            if e < hi:
                hk[size] = e
                hid[size] = i * m + j
                size += 1
    return size


@njit(cache=True, nogil=True)
def _collect_above(
    U: np.ndarray, t: float, hi: float, hk: np.ndarray, hid: np.ndarray, qu: np.ndarray,
    qv: np.ndarray,
) -> tuple[int, int]:
    """Edges with t < weight < hi into (hk, hid) and weight == t into (qu, qv).

    Scans U row by row (an edge is found through its larger entry, taken once).
    Returns the two counts.
    """
    m = U.shape[0]
    size = 0
    neq = 0
    for i in range(m):
        for j in range(m):
            x = U[i, j]
            if x >= t and x < hi and i != j:
                c = U[j, i]
                if c > x or (c == x and i > j):
                    continue  # {i, j} is taken at (j, i), in this round or before
                lo = min(i, j)
                up = max(i, j)
                if x > t:
                    hk[size] = x
                    hid[size] = lo * m + up
                    size += 1
                else:
                    qu[neq] = lo
                    qv[neq] = up
                    neq += 1
    return size, neq


@njit(cache=True, nogil=True)
def _count_above(U: np.ndarray, w: float) -> int:
    """#{entries of U > w} (the diagonal included)."""
    m = U.shape[0]
    count = 0
    for i in range(m):
        for j in range(m):
            count += U[i, j] > w
    return count


@njit(cache=True, nogil=True)
def _birth_one(
    U: np.ndarray, hk: np.ndarray, hid: np.ndarray, bu: np.ndarray, bv: np.ndarray,
    qu: np.ndarray, qv: np.ndarray, parent: np.ndarray, adj: np.ndarray,
    pend: np.ndarray, ridx: np.ndarray, sample: np.ndarray, top: np.ndarray,
) -> tuple[int, float]:
    """(birth, w*) of one m×m map; (0, nan) when β1 stays 0.

    Rounds: select the edges with t ≤ weight < hi (t from the sample; the ones equal to t
    form one complete tied block, kept aside), pop the others from a max-heap block by
    block, then the block at t; lower t and repeat until a birth or no edge is left.
    At a birth, b = 1 + #{entries of U > w*} is counted in one pass over U.
    """
    m = U.shape[0]
    if m < 4:
        return 0, np.nan
    nedges = m * (m - 1) // 2
    for i in range(m):
        parent[i] = i
        for k in range(adj.shape[1]):
            adj[i, k] = 0
    nsample = _sample_entries(U, sample)
    hi = np.inf
    target = m
    npresent = 0
    while True:
        t = _threshold(sample, nsample, target, m, hi, top)
        if t == -np.inf:
            size = _collect_all(U, hi, hk, hid)
            neq = 0
        else:
            size, neq = _collect_above(U, t, hi, hk, hid, qu, qv)
        for i in range(size // 2 - 1, -1, -1):
            _sift_down(hk, hid, i, size)
        wstar = np.nan
        while size > 0:
            w = hk[0]
            nb = 0
            while size > 0 and hk[0] == w:
                bu[nb] = hid[0] // m
                bv[nb] = hid[0] % m
                nb += 1
                size -= 1
                hk[0] = hk[size]
                hid[0] = hid[size]
                _sift_down(hk, hid, 0, size)
            if nb == 1 and npresent + 1 < nedges:  # common case: one edge, no tie
                if not _try_add(parent, adj, bu[0], bv[0]):
                    wstar = w
                    break
            elif _block_has_cycle(bu, bv, nb, npresent, nedges, parent, adj, pend, ridx, m):
                wstar = w
                break
            npresent += nb
        if np.isnan(wstar) and neq > 0:
            if _block_has_cycle(qu, qv, neq, npresent, nedges, parent, adj, pend, ridx, m):
                wstar = t
            npresent += neq
        if not np.isnan(wstar):
            return 1 + _count_above(U, wstar), wstar
        if t == -np.inf or npresent == nedges:
            return 0, np.nan
        hi = t
        target *= 2


@njit(cache=True, nogil=True)
def _births_into(maps: np.ndarray, births: np.ndarray, wstars: np.ndarray) -> None:
    """Fill births [N] (int64, 0 = none) and w* [N] (float64, nan = none) of maps [N, m, m]."""
    m = maps.shape[1]
    nedges = max(m * (m - 1) // 2, 1)
    hk = np.empty(nedges, np.float64)
    hid = np.empty(nedges, np.int64)
    bu = np.empty(nedges, np.int64)
    bv = np.empty(nedges, np.int64)
    qu = np.empty(nedges, np.int64)
    qv = np.empty(nedges, np.int64)
    parent = np.empty(m, np.int64)
    adj = np.empty((m, max((m + 63) >> 6, 1)), np.uint64)
    pend = np.empty(nedges, np.int64)
    ridx = np.full(m * m, -1, np.int64)
    sample = np.empty(_MAX_SAMPLE, np.float64)
    top = np.empty(_MAX_SAMPLE, np.float64)
    for k in range(maps.shape[0]):
        b, w = _birth_one(maps[k], hk, hid, bu, bv, qu, qv, parent, adj, pend, ridx,
                          sample, top)
        births[k] = b
        wstars[k] = w


def births_batch(maps: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """maps [N, m, m] (C-contiguous float32/float64) → (births int64 [N], w* float64 [N]).

    Birth = 1 + #{entries of U > w*} (0 = none), w* = the largest threshold with β1 ≠ 0
    (nan when none). With threads > 1 the maps are split over that many threads (the
    kernel releases the GIL).
    """
    n = maps.shape[0]
    births = np.zeros(n, np.int64)
    wstars = np.full(n, np.nan)
    threads = max(1, min(threads, n, n * maps.shape[1] ** 2 // _ENTRIES_PER_THREAD))
    if threads == 1:
        _births_into(maps, births, wstars)
        return births, wstars
    bounds = [k * n // threads for k in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(_births_into, maps[a:b], births[a:b], wstars[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        for job in jobs:
            job.result()
    return births, wstars


def num_threads() -> int:
    """Threads the engine uses by default: torch's CPU thread count (``torch.set_num_threads``).

    The engine runs its nogil kernels on plain Python threads. It never asks numba for its
    thread count: that would start numba's OpenMP layer, whose idle threads then compete
    with torch's and slow every later training step about tenfold.
    """
    import torch

    return int(torch.get_num_threads())
