"""Same seed twice → identical scores and removed channels (in-process, small settings)."""

from __future__ import annotations

import pytest
import torch
from helpers import small_data

import scoring
from prune.pipeline.selection import ScoringData, select_and_prune
from prune.pipeline.surgery import Surgeon
from prune.zoo.data import choose_classes
from prune.zoo.embedded_model import EmbeddedVGG


def _select(seed: int, scorer: str) -> list:
    """Decisions of one progressive selection on a seeded embedded-architecture model."""
    torch.manual_seed(1234)
    model = EmbeddedVGG(num_classes=10).eval()
    data = small_data()
    source = ScoringData(data=data, classes=choose_classes(data, 3, seed=seed), per_class=6, seed=seed)
    surgeon = Surgeon(model, torch.zeros(1, 3, data.input_size, data.input_size))
    return select_and_prune(surgeon, scoring.create(scorer), source, ratio=0.5, quiet=True)


@pytest.mark.parametrize("scorer", ["entropy", "apoz"])
def test_same_seed_same_scores_and_channels(scorer):
    first, second = _select(0, scorer), _select(0, scorer)
    assert [d.removed for d in first] == [d.removed for d in second]
    for a, b in zip(first, second):
        assert torch.equal(a.scores, b.scores), a.name


def test_seed_chooses_the_scoring_images():
    data = small_data()
    assert choose_classes(data, 3, seed=0) == choose_classes(data, 3, seed=0)
    first, other = _select(0, "entropy"), _select(1, "entropy")
    assert any(not torch.equal(a.scores, b.scores) for a, b in zip(first, other))
