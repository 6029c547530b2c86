"""HRank and CHIP on maps whose ranks and nuclear norms are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scoring import ClassBatch, LayerSpec, create
from scoring.chip import channel_independence


def layer(channels: int) -> LayerSpec:
    conv = nn.Conv2d(1, channels, 1)
    return LayerSpec(model=conv, conv=conv, name="conv")


def batches(maps: torch.Tensor) -> list[ClassBatch]:
    """maps [n, C, m, m] as one class."""
    return [ClassBatch(0, torch.zeros(maps.shape[0], 1, 1, 1), maps)]


def test_hrank_counts_the_rank_of_each_map() -> None:
    u, v = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 2.0])
    outer = torch.outer(u, v)  # rank 1
    repeated = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])  # two equal rows: rank 2
    full = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])  # rank 3
    zeros = torch.zeros(3, 3)  # a dead unit: rank 0
    one = torch.stack([outer, repeated, full, zeros])
    two = torch.stack([full, full, outer, zeros])  # a second image: mean ranks (1+3)/2, (2+3)/2, (3+1)/2, 0
    scores = create("hrank")(layer(4), batches(torch.stack([one, two])))
    assert scores.tolist() == [2.0, 2.5, 2.0, 0.0]


def test_hrank_counts_a_tiny_but_real_singular_value() -> None:
    """Ranks in float64 with the default tolerance: diag(1, 1e-9) has rank 2; float32's tolerance
    (σ_max · 2 · 1.2e-7) would drop the small singular value and say 1."""
    maps = torch.diag(torch.tensor([1.0, 1e-9])).reshape(1, 1, 2, 2)
    assert create("hrank")(layer(1), batches(maps)).tolist() == [2.0]
    assert int(torch.linalg.matrix_rank(maps[0, 0].float())) == 1


def test_chip_equals_the_nuclear_norms_by_hand() -> None:
    # orthogonal rows (3, 0) and (0, 4): ‖A‖_* = 7; zeroing row 0 leaves 4, row 1 leaves 3
    orthogonal = torch.tensor([[3.0, 0.0], [0.0, 4.0]]).reshape(2, 1, 2)
    assert channel_independence(orthogonal.double()).tolist() == pytest.approx([3.0, 4.0])
    # parallel rows (1, 0) and (2, 0): ‖A‖_* = √5; zeroing row 0 leaves 2, row 1 leaves 1
    parallel = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).reshape(2, 1, 2)
    assert channel_independence(parallel.double()).tolist() == pytest.approx([math.sqrt(5) - 2, math.sqrt(5) - 1])
    # a third, zero row changes nothing and scores exactly 0
    with_dead = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]).reshape(3, 1, 2)
    assert channel_independence(with_dead.double()).tolist() == pytest.approx([3.0, 4.0, 0.0])
    assert channel_independence(with_dead.double())[2].item() == 0.0


def test_chip_matches_svd_nuclear_norms() -> None:
    torch.manual_seed(0)
    maps = torch.relu(torch.randn(5, 4, 4, dtype=torch.float64))
    a = maps.reshape(5, -1)
    whole = torch.linalg.matrix_norm(a, "nuc")
    expected = []
    for c in range(5):
        zeroed = a.clone()
        zeroed[c] = 0
        expected.append(float(whole - torch.linalg.matrix_norm(zeroed, "nuc")))
    assert channel_independence(maps).tolist() == pytest.approx(expected, abs=1e-9)


def test_chip_scores_are_the_mean_over_images() -> None:
    one = torch.tensor([[3.0, 0.0], [0.0, 4.0]]).reshape(1, 2, 1, 2)
    two = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).reshape(1, 2, 1, 2)
    scores = create("chip")(layer(2), batches(torch.cat([one, two])))
    assert scores.tolist() == pytest.approx([(3 + math.sqrt(5) - 2) / 2, (4 + math.sqrt(5) - 1) / 2], rel=1e-6)
