"""Feature entropy, selective rate and the `entropy` scorer."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import scoring
from scoring import ClassBatch, LayerSpec
from scoring.entropy import feature_entropy, ineffectiveness, selective_rate


def test_entropy_by_hand() -> None:
    births = np.array([3, 3, 5, 0, 7, 3, 0, 5, 5, 5])  # N = 10, ε = 0.8
    p = {3: 0.3, 5: 0.4, 7: 0.1}
    expected = -sum(v * math.log(v) for v in p.values())
    assert feature_entropy(births) == pytest.approx(expected, rel=1e-12)
    assert selective_rate(births) == pytest.approx(0.8)


def test_entropy_identical_births_is_zero_and_scattered_is_log_n() -> None:
    assert feature_entropy(np.full(20, 4)) == 0.0
    assert feature_entropy(np.arange(1, 21)) == pytest.approx(math.log(20))


def test_low_selective_rate_rule() -> None:
    births = np.zeros(20, dtype=np.int64)
    births[0] = 9  # ε = 0.05 < p
    assert feature_entropy(births) == pytest.approx(0.95 * math.log(20))
    assert feature_entropy(births, p=0.05) == pytest.approx(-0.05 * math.log(0.05))
    assert feature_entropy(np.zeros(7, dtype=int)) == pytest.approx(math.log(7))


def test_single_image() -> None:
    assert feature_entropy(np.array([5])) == 0.0
    assert feature_entropy(np.array([0])) == 0.0  # (1 − 0)·ln 1


def test_vectorised_over_leading_dims_and_torch() -> None:
    rng = np.random.default_rng(0)
    births = rng.integers(0, 6, (3, 4, 25))
    out = feature_entropy(births)
    assert out.shape == (3, 4) and out.dtype == np.float64
    for i in range(3):
        for j in range(4):
            assert out[i, j] == pytest.approx(feature_entropy(births[i, j]), abs=1e-12)
    assert np.allclose(feature_entropy(torch.from_numpy(births)), out)
    assert selective_rate(births).shape == (3, 4)


WORST = 100.0 * math.log(100.0)


def test_authors_entropy_normalises_by_births() -> None:
    births = np.array([2, 2, 4, 4, 0, 0, 0, 0, 0, 0])  # over the 4 born: P = 1/2, 1/2
    assert feature_entropy(births, convention="authors") == pytest.approx(math.log(2))
    assert feature_entropy(np.zeros(5, int), convention="authors") == 0.0  # none born


def test_ineffectiveness_by_hand() -> None:
    # N = 10, 4 born (ε = 0.4), H = ln 2 → d = ln 2 / 0.4
    births = np.array([2, 2, 4, 4, 0, 0, 0, 0, 0, 0])
    assert ineffectiveness(births) == pytest.approx(math.log(2) / 0.4, rel=1e-12)
    # N = 8, 6 born as 3, 3, 3, 7, 7, 9: H = −(½ ln ½ + ⅓ ln ⅓ + ⅙ ln ⅙), ε = 0.75
    births = np.array([3, 0, 3, 7, 3, 9, 0, 7])
    h = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)
    assert ineffectiveness(births) == pytest.approx(h / 0.75, rel=1e-12)
    # 9 × 3 and 1 × 5, all born: H = −(0.9 ln 0.9 + 0.1 ln 0.1) ≈ 0.325 ≥ 0.1, kept
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert ineffectiveness(np.array([3] * 9 + [5])) == pytest.approx(h, rel=1e-12)


def test_ineffectiveness_worst_rule() -> None:
    assert ineffectiveness(np.zeros(6, int)) == pytest.approx(WORST)  # ε = 0: d = H = 0
    assert ineffectiveness(np.full(6, 4)) == pytest.approx(WORST)  # one birth time: H = 0
    # 99 × 3 and 1 × 5: H = −(0.99 ln 0.99 + 0.01 ln 0.01) ≈ 0.056 < 0.1 → worst
    assert -(0.99 * math.log(0.99) + 0.01 * math.log(0.01)) < 0.1
    assert ineffectiveness(np.array([3] * 99 + [5])) == pytest.approx(WORST)
    # the same entropy with ε = 0.5 doubles d to ≈ 0.112 ≥ 0.1: kept
    births = np.array([3] * 99 + [5] + [0] * 100)
    h = -(0.99 * math.log(0.99) + 0.01 * math.log(0.01))
    assert ineffectiveness(births) == pytest.approx(h / 0.5, rel=1e-12)


def test_ineffectiveness_vectorised_and_torch() -> None:
    rng = np.random.default_rng(3)
    births = rng.integers(0, 5, (3, 4, 12))
    out = ineffectiveness(births)
    assert out.shape == (3, 4) and out.dtype == np.float64
    for i in range(3):
        for j in range(4):
            assert out[i, j] == ineffectiveness(births[i, j])
    assert np.array_equal(ineffectiveness(torch.from_numpy(births)), out)


def test_reference_alias_warns_once_and_matches_authors() -> None:
    births = np.array([2, 2, 4, 4, 0, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = feature_entropy(births, convention="reference")
    assert [w.category for w in caught] == [FutureWarning]
    assert got == feature_entropy(births, convention="authors")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"convention": "gudhi"}, "unknown convention"),
        ({"convention": None}, None),  # None options are dropped: the default applies
        ({"p": 1.5}, "p must be in"),
        ({"p": -0.1}, "p must be in"),
        ({"p": float("nan")}, "p must be in"),
        ({"p": "high"}, "p must be a number"),
    ],
)
def test_invalid_options_raise_one_line(options: dict, match: str | None) -> None:
    if match is None:
        assert scoring.create("entropy", **options).convention == "paper"
        return
    with pytest.raises(ValueError, match=match) as err:
        scoring.create("entropy", **options)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=match):
        feature_entropy(np.array([1, 2]), **options)


@pytest.mark.parametrize(
    "births, match",
    [(np.array([1, -2]), "≥ 0"), (np.zeros((3, 0)), "N ≥ 1"), (np.array([1.5]), "integers")],
)
def test_bad_births_raise(births: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        feature_entropy(births)


def _layer(channels: int) -> LayerSpec:
    conv = nn.Conv2d(3, channels, 3)
    return LayerSpec(model=conv, conv=conv, name="conv")


def _batch(k: int, acts: torch.Tensor) -> ClassBatch:
    return ClassBatch(class_index=k, images=torch.zeros(acts.shape[0], 3, 4, 4), activations=acts)


def test_scorer_contract_and_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    n, m = 12, 10
    stable = torch.rand(1, m, m, generator=gen).expand(n, m, m)  # same map: same birth
    scattered = torch.rand(n, m, m, generator=gen)
    acts = torch.stack([stable, scattered], dim=1)  # [N, 2, m, m]
    scorer = scoring.create("entropy")
    assert scoring.scorer_info("entropy").needs_data
    scores = scorer(_layer(2), [_batch(0, acts)])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert scores[0] == 0.0 and scores[0] > scores[1]
    assert torch.equal(scorer(_layer(2), [_batch(0, acts)]), scores)  # deterministic


def test_scorer_streams_classes_as_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    classes = [torch.relu(torch.randn(15, 3, 8, 8, generator=gen)) for _ in range(3)]
    per_class = [
        feature_entropy(scoring.topology.birth_times(a).T) for a in classes
    ]
    scores = scoring.create("entropy")(_layer(3), [_batch(k, a) for k, a in enumerate(classes)])
    expected = -np.mean(per_class, axis=0)
    assert np.allclose(scores.numpy(), expected, atol=1e-6)


def test_scorer_rejects_bad_activations() -> None:
    scorer = scoring.create("entropy")
    scorer.reset(_layer(2))
    with pytest.raises(ValueError, match="square"):
        scorer.update(_batch(0, torch.rand(4, 2, 6, 8)))
    with pytest.raises(ValueError, match=r"\[N, C, m, m\]"):
        scorer.update(_batch(0, torch.rand(2, 6, 6)))
    with pytest.raises(ValueError, match="NaN"):
        scorer.update(_batch(0, torch.full((2, 2, 5, 5), float("nan"))))
    with pytest.raises(ValueError, match="needs data"):
        scorer.compute()
    with pytest.raises(ValueError, match="convention"):
        scoring.create("entropy", convention="gudhi")


def _fig2(values: list[float]) -> torch.Tensor:
    """4×4 map whose pairs {0,1}, {2,3}, {1,3}, {0,2} (a 4-cycle) carry `values`; the other
    two pairs are below 0.13. Authors' birth: [10, 9, 8, 7] → 3, [10, 9, 9, 7] → 2,
    [10, 10, 8, 8] → 1, [10] * 4 → t* = 1 → none (see tests/test_topology.py)."""
    U = torch.arange(16, dtype=torch.float64).reshape(4, 4) / 100.0
    for (i, j), v in zip([(0, 1), (3, 2), (1, 3), (2, 0)], values):
        U[i, j] = v
    return U


_BIRTH_MAPS = {3: [10.0, 9.0, 8.0, 7.0], 2: [10.0, 9.0, 9.0, 7.0], 1: [10.0, 10.0, 8.0, 8.0],
               0: [10.0] * 4}


def _acts(births: list[list[int]]) -> torch.Tensor:
    """Activations [N, C, 4, 4] with the given authors' births [C][N]."""
    return torch.stack(
        [torch.stack([_fig2(_BIRTH_MAPS[b]) for b in unit]) for unit in births], dim=1
    )


def test_authors_scorer_is_minus_mean_ineffectiveness_by_hand() -> None:
    classes = [
        _acts([[3, 3, 3, 3], [3, 2, 0, 0]]),  # class 0
        _acts([[3, 1, 0, 0], [2, 2, 1, 0]]),  # class 1
    ]
    assert scoring.topology.birth_times(classes[1], convention="authors").T.tolist() == [
        [3, 1, 0, 0], [2, 2, 1, 0]
    ]
    # unit 0: class 0 one birth time → H = 0 → worst; class 1 ε = ½, H = ln 2 → d = 2 ln 2
    # unit 1: class 0 as unit 0 of class 1 → 2 ln 2; class 1 ε = ¾, P = ⅔, ⅓
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    expected = [-(WORST + 2 * math.log(2)) / 2, -(2 * math.log(2) + h / 0.75) / 2]
    batches = [_batch(k, a) for k, a in enumerate(classes)]
    scores = scoring.create("entropy", convention="authors")(_layer(2), batches)
    assert scores.dtype == torch.float32
    assert np.allclose(scores.numpy(), expected, rtol=1e-6)
    # class-sharded: each class's state, merged, gives the same scores bitwise
    states = []
    for batch in batches:
        one = scoring.create("entropy", convention="authors")
        one.reset(_layer(2))
        one.update(batch)
        states.append(one.state())
    merged = scoring.create("entropy", convention="authors")
    merged.reset(_layer(2))
    merged.merge(states)
    assert torch.equal(merged.compute(), scores)
    # the deprecated name: one FutureWarning for the whole run, same scores
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = scoring.create("entropy", convention="reference")(_layer(2), batches)
    assert [w.category for w in caught] == [FutureWarning]
    assert torch.equal(old, scores)
