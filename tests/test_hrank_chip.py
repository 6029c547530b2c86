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


def test_hrank_tolerance_follows_the_maps_precision() -> None:
    """A rank-1 map made in float32 has rank 1 (float64's tolerance would count its rounding);
    diag(1, 1e-9) is rank 2 given in float64 and rank 1 in float32 (below σ_max · 2 · 2^-23)."""
    u, v = torch.rand(8, generator=torch.Generator().manual_seed(1)), torch.rand(8) + 0.1
    outer = torch.outer(u, v).reshape(1, 1, 8, 8)  # float32 products
    assert create("hrank")(layer(1), batches(outer)).tolist() == [1.0]
    tiny = torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64)).reshape(1, 1, 2, 2)
    assert create("hrank")(layer(1), batches(tiny)).tolist() == [2.0]
    assert create("hrank")(layer(1), batches(tiny.float())).tolist() == [1.0]


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


def nuclear_norm_drops(maps: torch.Tensor) -> torch.Tensor:
    """‖A‖_* − ‖A with row c zeroed‖_* [C] by C + 1 SVDs (the reference's formulation)."""
    a = maps.reshape(maps.shape[0], -1)
    whole = torch.linalg.matrix_norm(a, "nuc")
    return torch.stack([whole - torch.linalg.matrix_norm(a * (torch.arange(len(a)) != c)[:, None], "nuc")
                        for c in range(len(a))])


@pytest.mark.parametrize(("channels", "side"), [(24, 6), (40, 5), (12, 2)])
def test_chip_equals_the_reference_where_a_row_alone_carries_a_rank(channels: int, side: int) -> None:
    """Rows that drop the rank when zeroed (a lone pixel no other map has; r = 0 also when
    C > m²), a parallel pair and a dead row: every CI within 1e-12·σ_1 of C + 1 SVDs."""
    torch.manual_seed(channels)
    maps = torch.relu(torch.randn(channels, side, side, dtype=torch.float64)) * 10
    maps[:, 0, 0] = 0
    maps[0] = 0
    maps[0, 0, 0] = 3.0  # the only map with pixel (0, 0), orthogonal to the rest: CI = 3 by hand
    maps[1] = 0.5 * maps[2]
    maps[3] = 0
    a = maps.reshape(channels, -1)
    got = channel_independence(maps)
    assert torch.allclose(got, nuclear_norm_drops(maps), rtol=0, atol=1e-12 * float(torch.linalg.svdvals(a)[0]))
    assert got[0].item() == pytest.approx(3.0, abs=1e-12 * float(torch.linalg.svdvals(a)[0]))  # row 0 ⟂ the rest
    assert got[3].item() == 0.0


def test_chip_stays_non_negative_with_more_channels_than_pixels() -> None:
    """64 channels of 2x2 maps (rank ≤ 4), one row almost a multiple of another: every CI ≥ 0 and
    equal to the SVD nuclear norms within 1e-9 of the largest singular value."""
    torch.manual_seed(3)
    maps = torch.relu(torch.randn(64, 2, 2, dtype=torch.float64))
    maps[0] = 1e-4 * maps[1]
    a = maps.reshape(64, -1)
    whole = torch.linalg.matrix_norm(a, "nuc")
    expected = torch.stack([whole - torch.linalg.matrix_norm(a * (torch.arange(64) != c)[:, None], "nuc")
                            for c in range(64)])
    got = channel_independence(maps)
    assert (got >= 0).all()
    assert torch.allclose(got, expected.clamp(min=0), atol=1e-9 * float(torch.linalg.svdvals(a)[0]))


def test_chip_scores_are_the_mean_over_images() -> None:
    one = torch.tensor([[3.0, 0.0], [0.0, 4.0]]).reshape(1, 2, 1, 2)
    two = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).reshape(1, 2, 1, 2)
    scores = create("chip")(layer(2), batches(torch.cat([one, two])))
    assert scores.tolist() == pytest.approx([(3 + math.sqrt(5) - 2) / 2, (4 + math.sqrt(5) - 1) / 2], rel=1e-6)


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_chip_scales_with_the_maps_over_the_whole_float64_range(scale: float) -> None:
    """CI is homogeneous of degree 1: maps × 1e±100 (a dead unit among them) give CI × 1e±100, finite."""
    torch.manual_seed(5)
    maps = torch.relu(torch.randn(12, 3, 3, dtype=torch.float64))
    maps[4] = 0
    got = channel_independence(maps * scale)
    assert torch.isfinite(got).all() and got[4].item() == 0.0
    torch.testing.assert_close(got / scale, channel_independence(maps), rtol=1e-12, atol=0)
