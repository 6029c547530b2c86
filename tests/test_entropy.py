"""Feature entropy, selective rate and the `entropy` scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import scoring
from scoring import ClassBatch, LayerSpec
from scoring.entropy import feature_entropy, selective_rate


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


def test_reference_convention_normalises_by_births() -> None:
    births = np.array([2, 2, 4, 4, 0, 0, 0, 0, 0, 0])
    assert feature_entropy(births, convention="reference") == pytest.approx(math.log(2))
    assert feature_entropy(np.zeros(5, int), convention="reference") == pytest.approx(
        math.log(5)
    )


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
