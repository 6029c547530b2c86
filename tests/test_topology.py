"""Birth-time engine vs the gudhi reference, hand-made filtrations, input checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from scoring.topology import (
    CONVENTIONS,
    authors_step_limit,
    betti1_curve,
    betti1_integral,
    betti1_max,
    birth_thresholds,
    birth_times,
    cubical_birth_times,
    gudhi_birth_time,
    resolve_convention,
)

KINDS = (
    "uniform", "integer", "binary", "negative", "relu", "symmetric", "constant",
    "blobs", "planted", "planted_tied", "tree_block", "float32", "band", "sparse",
)


def _blobs(rng: np.random.Generator, m: int) -> np.ndarray:
    yy, xx = np.mgrid[:m, :m]
    out = np.zeros((m, m))
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, m, 2)
        s = rng.uniform(0.5, max(1.0, m / 4))
        out += rng.uniform(0.5, 2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return np.maximum(out - rng.uniform(0, 0.5), 0)


def _planted(rng: np.random.Generator, m: int, tied: bool) -> np.ndarray:
    """Noise with a cycle of strong entries, some chords, optionally all tied."""
    U = rng.random((m, m)) * (rng.integers(0, 3, (m, m)) if tied else 1)
    if m < 3:
        return U
    length = int(rng.integers(3, m + 1))
    cyc = rng.permutation(m)[:length]
    for k in range(length):
        i, j = cyc[k], cyc[(k + 1) % length]
        U[i, j] = 5.0 if tied else 5.0 + rng.random()
    for _ in range(int(rng.integers(0, 3))):
        i, j = rng.choice(cyc, 2, replace=False)
        U[j, i] = 5.0 if tied or rng.random() < 0.5 else 4.5
    return U


def _tree_block(rng: np.random.Generator, m: int) -> np.ndarray:
    """A spanning path of distinct high values, then one tied block of random chords:
    the block is usually stuck for the greedy rule and needs the GF(2) rank."""
    U = np.zeros((m, m))
    path = rng.permutation(m)
    for k in range(m - 1):
        U[path[k], path[k + 1]] = 10.0 + k
    chords = rng.random((m, m)) < rng.uniform(0.05, 0.6)
    U[chords & (U == 0)] = 5.0
    return U


def random_map(rng: np.random.Generator, m: int, kind: str) -> np.ndarray:
    """One m×m test map of the given kind."""
    if kind == "uniform":
        return rng.random((m, m))
    if kind == "integer":
        return rng.integers(0, int(rng.integers(2, 6)), (m, m)).astype(np.float64)
    if kind == "binary":
        return (rng.random((m, m)) < rng.uniform(0.05, 0.95)).astype(np.float64)
    if kind == "negative":
        return -rng.random((m, m)) * 10 - 3
    if kind == "relu":
        return np.maximum(rng.normal(size=(m, m)), 0)
    if kind == "symmetric":
        A = rng.integers(-3, 4, (m, m)).astype(np.float64)
        return A + A.T
    if kind == "constant":
        return np.full((m, m), float(rng.integers(-2, 3)))
    if kind == "blobs":
        return _blobs(rng, m)
    if kind == "planted":
        return _planted(rng, m, tied=False)
    if kind == "planted_tied":
        return _planted(rng, m, tied=True)
    if kind == "tree_block":
        return _tree_block(rng, m)
    if kind == "float32":
        return rng.normal(size=(m, m)).astype(np.float32).round(1)
    if kind == "band":  # −|i − j|: every new edge closes a triangle, usually no birth
        i, j = np.indices((m, m))
        return -np.abs(i - j) + (rng.random((m, m)) < 0.02) * rng.integers(-2, 3, (m, m))
    if kind == "sparse":  # few positive entries, a large tied zero block
        return np.maximum(rng.normal(size=(m, m)) - rng.uniform(0.5, 2.5), 0)
    raise ValueError(kind)


def _mismatches(seed: int, count: int, sizes: np.ndarray) -> list[tuple]:
    rng = np.random.default_rng(seed)
    cases = [
        random_map(rng, int(rng.choice(sizes)), KINDS[k % len(KINDS)]) for k in range(count)
    ]
    bad = []
    for m in sorted({c.shape[0] for c in cases}):
        batch = [c for c in cases if c.shape[0] == m]
        got = birth_times(np.stack(batch))
        for U, b in zip(batch, got):
            ref = gudhi_birth_time(U)
            if b != ref:
                bad.append((m, int(b), ref, U.tolist()))
    return bad


def test_engine_matches_gudhi_random_kinds() -> None:
    assert _mismatches(seed=0, count=490, sizes=np.arange(1, 41)) == []


def test_engine_matches_gudhi_large_maps() -> None:
    assert _mismatches(seed=1, count=14, sizes=np.array([64, 100])) == []


def test_births_split_over_threads_equal_one_thread() -> None:
    """The engine splits a large batch over threads (torch's thread count by default; the tests run
    one thread a worker, so this is where the split path runs): the same births and thresholds."""
    from scoring.topology import _engine

    maps = np.random.default_rng(4).random((400, 32, 32))
    assert maps.size // _engine._ENTRIES_PER_THREAD >= 2  # large enough to be split
    one, two = _engine.births_batch(maps, threads=1), _engine.births_batch(maps, threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert (one[0] > 0).all()


@pytest.mark.slow
def test_engine_matches_gudhi_ten_thousand() -> None:
    assert _mismatches(seed=2, count=10_000, sizes=np.arange(1, 41)) == []


@pytest.mark.slow
def test_engine_matches_gudhi_large_many() -> None:
    assert _mismatches(seed=3, count=60, sizes=np.array([64, 100, 128])) == []


def _four_cycle(values: list[float]) -> np.ndarray:
    """Paper Fig. 2 style: top entries at (0,1), (3,2), (1,3), (2,0) form a 4-cycle."""
    U = np.arange(16, dtype=np.float64).reshape(4, 4) / 100.0
    for (i, j), v in zip([(0, 1), (3, 2), (1, 3), (2, 0)], values):
        U[i, j] = v
    return U


def test_fig2_cycle_distinct_values_is_born_at_4() -> None:
    U = _four_cycle([10.0, 9.0, 8.0, 7.0])
    assert birth_times(U) == 4 == gudhi_birth_time(U)
    assert birth_thresholds(U) == 7.0
    assert list(betti1_curve(U)[:5]) == [0, 0, 0, 1, 1]


def test_fig2_cycle_as_one_tied_block_is_born_at_1() -> None:
    U = _four_cycle([10.0] * 4)
    assert birth_times(U) == 1 == gudhi_birth_time(U)


def test_triangle_gives_no_birth() -> None:
    U = np.array([[0, 9, 0], [0, 0, 8], [7, 0, 0]], dtype=float)
    assert birth_times(U) == 0 == gudhi_birth_time(U)
    # top three entries form a triangle in a 4-map: β1 stays 0 at step 3
    U4 = np.zeros((4, 4))
    U4[0, 1], U4[1, 2], U4[2, 0] = 9, 8, 7
    assert betti1_curve(U4)[2] == 0
    assert birth_times(U4) == gudhi_birth_time(U4)


@pytest.mark.parametrize("value", [0.0, 1.5, -3.0])
def test_constant_map_has_no_birth(value: float) -> None:
    assert birth_times(np.full((9, 9), value)) == 0
    assert birth_times(np.zeros((3, 20, 20))).tolist() == [0, 0, 0]


def test_tied_block_that_closes_and_fills_a_cycle() -> None:
    U = _four_cycle([10.0] * 4)
    U[0, 3] = 10.0  # a chord in the same block: two triangles, no hole
    assert birth_times(U) == 0 == gudhi_birth_time(U)
    # a path a–p–q–w–x, then one block {a,w}, {a,x}: both stuck for the greedy rule;
    # they fill triangle a-w-x but leave the 4-cycle a-p-q-w open
    P = np.zeros((5, 5))
    P[0, 1], P[1, 2], P[2, 3], P[3, 4] = 9, 8, 7, 6
    P[0, 3] = P[0, 4] = 5
    assert birth_times(P) == gudhi_birth_time(P) == 5


def test_stuck_block_decided_by_rank() -> None:
    """After a spanning path, one tied block of 9 chords: 8 of them fail the one-edge
    rule (connected, no common neighbour) yet together they leave β1 = 0."""
    path = [1, 2, 0, 5, 4, 3, 6]
    U = np.zeros((7, 7))
    for k in range(6):
        U[path[k], path[k + 1]] = 10.0 + k
    for i, j in [(0, 4), (0, 6), (1, 3), (1, 4), (1, 5), (1, 6), (2, 3), (2, 6), (5, 6)]:
        U[i, j] = 5.0
    assert birth_times(U) == gudhi_birth_time(U) == 0
    U[1, 6] = 0.0  # drop one chord: the block now leaves a hole
    assert birth_times(U) == gudhi_birth_time(U) == 7


@pytest.mark.parametrize("kind", ["uniform", "integer", "relu", "planted_tied"])
def test_births_invariant_under_scale_and_shift(kind: str) -> None:
    rng = np.random.default_rng(5)
    maps = np.stack([random_map(rng, 12, kind) for _ in range(20)])
    base = birth_times(maps)
    assert np.array_equal(birth_times(maps * 4.0), base)
    assert np.array_equal(birth_times(maps * 0.25 + 7.0), base)


def test_shapes_dtypes_and_torch_input() -> None:
    rng = np.random.default_rng(6)
    maps = rng.random((2, 3, 10, 10))
    ref = birth_times(maps)
    assert ref.shape == (2, 3) and ref.dtype == np.int64
    assert np.array_equal(birth_times(torch.from_numpy(maps)), ref)
    assert np.array_equal(birth_times(maps.astype(np.float32)), birth_times(
        torch.from_numpy(maps).to(torch.float32)))
    half = torch.from_numpy(maps).to(torch.float16)
    assert np.array_equal(birth_times(half), birth_times(half.float().numpy()))
    assert birth_times(maps[0, 0]).shape == ()
    assert birth_times(np.zeros((0, 5, 5))).shape == (0,)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_maps_smaller_than_four_have_no_birth(m: int) -> None:
    assert birth_times(np.random.default_rng(m).random((4, m, m))).tolist() == [0] * 4


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_maps_raise(bad: float, word: str) -> None:
    maps = np.zeros((2, 5, 5))
    maps[1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"{word} at index \(1, 2, 3\)"):
        birth_times(maps)


def test_bad_shapes_and_convention_raise() -> None:
    with pytest.raises(ValueError, match="square"):
        birth_times(np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\[\.\.\., m, m\]"):
        birth_times(np.zeros(5))
    with pytest.raises(ValueError, match="convention"):
        birth_times(np.zeros((4, 4)), convention="exact")


# ---------------------------------------------------------------- authors' convention
# Steps: the distinct off-diagonal values of S = max(U, Uᵀ), descending, are steps 1, 2, …;
# b = t* − 1 (t* = first step with β1 ≠ 0); none if b = 0, b > 50 or t* > ⌈0.8·C(m, 2)⌉.


def test_authors_fig2_cycle_distinct_values() -> None:
    # _four_cycle: S{0,1}=10 (t=1), S{2,3}=9 (t=2), S{1,3}=8 (t=3), S{0,2}=7 (t=4);
    # S{0,3}=max(.03,.12)=.12 (t=5), S{1,2}=max(.06,.09)=.09 (t=6). At t=4 the edges 0-1,
    # 1-3, 3-2, 2-0 form a 4-cycle without chords: t* = 4 ≤ T = ⌈0.8·6⌉ = 5, so b = 3.
    U = _four_cycle([10.0, 9.0, 8.0, 7.0])
    assert birth_times(U, convention="authors") == 3
    # the diagonal never counts: two diagonal entries above every value shift the paper
    # rank (1 + #entries > 7 = 1 + 5) but not the authors' steps
    U[0, 0] = U[1, 1] = 50.0
    assert birth_times(U, convention="authors") == 3
    assert birth_times(U) == 6


def test_authors_ties_enter_at_the_same_step() -> None:
    # S{2,3} = S{1,3} = 9: both enter at t=2; S{0,2} = 7 is t=3 and closes the 4-cycle:
    # t* = 3, b = 2 (the paper rank is 1 + #{entries > 7} = 4)
    U = _four_cycle([10.0, 9.0, 9.0, 7.0])
    assert birth_times(U, convention="authors") == 2
    assert birth_times(U) == 4
    # t=1 adds {0,1}, {2,3} (two disjoint edges), t=2 adds {1,3}, {0,2}: the cycle, b = 1
    U = _four_cycle([10.0, 10.0, 8.0, 8.0])
    assert birth_times(U, convention="authors") == 1


def test_authors_tied_block_at_step_one_is_no_birth() -> None:
    # all four cycle pairs share the largest value: the cycle exists at t* = 1, b = 0 →
    # none (the paper convention gives 1)
    U = _four_cycle([10.0] * 4)
    assert birth_times(U, convention="authors") == 0
    assert birth_times(U) == 1
    assert birth_times(np.ones((5, 5)), convention="authors") == 0  # never a cycle


def _gudhi_first_h1(U: np.ndarray) -> float | None:
    """w*: minus the earliest H1 birth of the flag filtration of −max(U, Uᵀ) (gudhi)."""
    import gudhi

    filt = -np.maximum(U, U.T).astype(np.float64)
    np.fill_diagonal(filt, filt.min() - 1.0)  # vertices before every edge
    st = gudhi.SimplexTree.create_from_array(filt)
    st.expansion(2)
    st.persistence(homology_coeff_field=2, persistence_dim_max=True)
    h1 = np.asarray(st.persistence_intervals_in_dimension(1)).reshape(-1, 2)
    return -float(h1[:, 0].min()) if len(h1) else None


def _pairs_map(m: int, steps: list[list[tuple[int, int]]], seed: int = 0) -> np.ndarray:
    """Map whose step k (0-based) is the tied group steps[k]: S = 1000 − k there; every
    other entry (incl. the lower side of listed pairs) is noise in [0, 1); diagonal 2000."""
    U = np.random.default_rng(seed).random((m, m))
    for k, group in enumerate(steps):
        for i, j in group:
            U[i, j] = 1000.0 - k
    np.fill_diagonal(U, 2000.0)
    return U


def _late_cycle_steps(chords: int) -> list[list[tuple[int, int]]]:
    """m = 12: star 0–1..10 (10 steps), `chords` pairs among 1..10 other than {1, 2}
    (each closes a triangle with 0), {1, 11} (joins 11), then {2, 11}: 11 and 2 are
    connected (11–1–0–2) and have no common neighbour, so the cycle 11-1-0-2 appears."""
    star = [[(0, k)] for k in range(1, 11)]
    inner = [[(i, j)] for i in range(1, 11) for j in range(i + 1, 11) if (i, j) != (1, 2)]
    return star + inner[:chords] + [[(1, 11)], [(2, 11)]]


@pytest.mark.parametrize("chords, expected", [(39, 50), (40, 0)])
def test_authors_births_after_50_are_none(chords: int, expected: int) -> None:
    # t* = 10 + chords + 2; b = t* − 1 = 50 (kept) or 51 (> 50 → none); T = ⌈0.8·66⌉ = 53
    steps = _late_cycle_steps(chords)
    U = _pairs_map(12, steps)
    assert _gudhi_first_h1(U) == 1000.0 - (len(steps) - 1)  # the construction holds
    assert birth_times(U, convention="authors") == expected


def _dense_cycle_steps(tie_first: bool) -> list[list[tuple[int, int]]]:
    """m = 10, G = complement of two stars 0–{1..4}, 5–{6..9} (37 pairs). Star from 1 to
    2..9 (8), the other pairs among 2..9 (24, each closes a triangle with 1), 0–6 (joins
    0), 0–7, 0–8, 0–9 (common neighbour 6), last 0–5: 0 has neighbours {6..9}, 5 has
    {1..4}, no common one → the first cycle appears only with the 37th pair."""
    h = {(5, 6), (5, 7), (5, 8), (5, 9)}
    star = [[(1, k)] for k in range(2, 10)]
    inner = [[(i, j)] for i in range(2, 10) for j in range(i + 1, 10) if (i, j) not in h]
    steps = star + inner + [[(0, 6)], [(0, 7)], [(0, 8)], [(0, 9)], [(0, 5)]]
    return ([steps[0] + steps[1]] + steps[2:]) if tie_first else steps


@pytest.mark.parametrize("tie_first, expected", [(False, 0), (True, 35)])
def test_authors_step_limit_cuts_late_dense_cycles(tie_first: bool, expected: int) -> None:
    # T = ⌈0.8·45⌉ = 36. Distinct values: t* = 37 > T → none (b = 36 ≤ 50, so only T cuts).
    # Tying the first two pairs (both safe) makes t* = 36 = T → b = 35.
    assert authors_step_limit(10) == 36 == math.ceil(0.8 * 45)
    steps = _dense_cycle_steps(tie_first)
    U = _pairs_map(10, steps, seed=1)
    assert _gudhi_first_h1(U) == 1000.0 - (len(steps) - 1)
    assert birth_times(U, convention="authors") == expected
    assert birth_times(U) > 0  # the paper convention has no such cap


def test_authors_births_match_gudhi_distinct_counts() -> None:
    """b = #{distinct off-diagonal S > gudhi's w*}, with the caps applied independently."""
    rng = np.random.default_rng(11)
    seen = {"kept": 0, "late": 0, "step one": 0, "none": 0}
    cases = [(int(rng.integers(4, 41)), KINDS[k % len(KINDS)]) for k in range(252)]
    # a tree block on m vertices, if it has a cycle, is born at b = m − 1: around the cap
    cases += [(int(rng.integers(48, 60)), ("tree_block", "blobs")[k % 2]) for k in range(24)]
    for m, kind in cases:
        U = random_map(rng, m, kind)
        w = _gudhi_first_h1(U)
        sym = np.maximum(U, U.T)[~np.eye(m, dtype=bool)]
        b = 0 if w is None else np.unique(sym[sym > w]).size
        limit = math.ceil(0.8 * m * (m - 1) / 2)
        case = ("none" if w is None else "step one" if b == 0 else "late" if b > 50
                else "cut" if b + 1 > limit else "kept")
        seen[case] = seen.get(case, 0) + 1
        expected = b if case == "kept" else 0
        assert birth_times(U, convention="authors") == expected, (case, U.tolist())
    assert min(seen.values()) > 0, seen  # every regime was exercised


def test_authors_batched_equals_one_by_one() -> None:
    rng = np.random.default_rng(12)
    maps = np.stack([random_map(rng, 16, KINDS[k % len(KINDS)]) for k in range(56)])
    maps = maps.astype(np.float64)
    batched = birth_times(maps.reshape(4, 14, 16, 16), convention="authors")
    assert batched.shape == (4, 14)
    one = [int(birth_times(U, convention="authors")) for U in maps]
    assert batched.ravel().tolist() == one
    assert np.array_equal(birth_times(torch.from_numpy(maps), convention="authors"), one)


def test_reference_is_a_deprecated_alias_of_authors() -> None:
    rng = np.random.default_rng(13)
    maps = rng.random((5, 9, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = birth_times(maps, convention="reference")
    assert [w.category for w in caught] == [FutureWarning]
    assert "authors" in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert np.array_equal(got, birth_times(maps, convention="authors"))
    assert CONVENTIONS == ("paper", "authors")
    with pytest.raises(ValueError, match="unknown convention"):
        resolve_convention("Authors")


def test_betti_curve_characterisations() -> None:
    U = _four_cycle([10.0, 9.0, 8.0, 7.0])
    curve = betti1_curve(U)
    assert curve.shape == (16,) and curve.dtype == np.int64
    assert betti1_max(U) == curve.max() == 1
    assert betti1_integral(U) == curve.sum()
    first = int(np.flatnonzero(curve)[0]) + 1
    assert first == birth_times(U)


def test_cubical_birth_times() -> None:
    ring = np.zeros((5, 5))
    ring[1:4, 1:4] = np.arange(3.0, 12.0).reshape(3, 3)
    ring[2, 2] = 0.0  # a bright ring around a dark pixel: H1 born when the ring closes
    ring[1, 2] = 2.0  # ... which needs its dimmest pixel (pixels touching at corners connect)
    assert cubical_birth_times(ring) == 8
    ring[1:4, 1:4] = 1.0
    ring[2, 2] = 0.0
    assert cubical_birth_times(ring) == 1  # the whole ring enters as one tied block
    assert cubical_birth_times(np.ones((2, 4, 4))).tolist() == [0, 0]
