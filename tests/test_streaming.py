"""Streaming units: the pipeline gives a scorer each class in chunks of images, bounded by
`ScoringData.chunk_bytes`, and the scores equal one update per whole class (bitwise)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import small_data

import scoring
from prune.pipeline.observe import iter_units
from prune.pipeline.selection import ScoringData, class_batches, score_group
from prune.pipeline.surgery import PrunableGroup
from prune.zoo.embedded_model import EmbeddedVGG

NAME = "features.0"  # units [N, 16, 32, 32] at 32 px: 64 KiB per image
PER_IMAGE = 16 * 32 * 32 * 4


def setup(chunk_images: int) -> tuple[torch.nn.Module, ScoringData]:
    """The embedded net (seeded random weights) and 3 classes × 7 images, with a unit budget of
    `chunk_images` images per chunk."""
    torch.manual_seed(0)
    model = EmbeddedVGG(num_classes=5).eval()
    source = ScoringData(small_data(), classes=[0, 2, 4], per_class=7, seed=0, chunk_bytes=chunk_images * PER_IMAGE)
    return model, source


def test_chunks_follow_the_budget() -> None:
    model, source = setup(3)
    images = torch.randn(8, 3, 32, 32)
    sizes = [units.shape[0] for _, units in iter_units(model, model.features[0], images, name=NAME,
                                                       chunk_bytes=source.chunk_bytes)]
    assert sizes == [1, 3, 3, 1]
    tiny = [units.shape[0] for _, units in iter_units(model, model.features[0], images, name=NAME, chunk_bytes=1)]
    assert tiny == [1] * 8  # at least one image


DATA_SCORERS = [n for n in scoring.list_scorers() if scoring.scorer_info(n).needs_data]


@pytest.mark.parametrize("chunk_images", [2, 3])  # 2 and 3 do not divide N = 7 (chunks 1+2+2+2, 1+3+3)
@pytest.mark.parametrize("name", DATA_SCORERS)
def test_streamed_scores_equal_whole_classes(name: str, chunk_images: int) -> None:
    model, source = setup(chunk_images)
    conv = model.features[0]
    layer = scoring.LayerSpec(model=model, conv=conv, name=NAME)
    whole = scoring.create(name)(layer, class_batches(model, conv, NAME, source))
    group = PrunableGroup(names=(NAME,), convs=(conv,))
    assert torch.equal(score_group(model, group, scoring.create(name), source), whole)


class _WholeClassSpy(scoring.Scorer):
    """Records the number of images of each update; declares it needs whole classes."""

    info = scoring.ScorerInfo("spy", needs_data=True, description="test")
    whole_class = True

    def reset(self, layer: scoring.LayerSpec) -> None:
        super().reset(layer)
        self.sizes: list[int] = []

    def update(self, batch: scoring.ClassBatch) -> None:
        self.sizes.append(batch.activations.shape[0])

    def compute(self) -> torch.Tensor:
        return torch.zeros(self.layer.num_channels)


def test_a_whole_class_scorer_gets_one_batch_per_class() -> None:
    model, source = setup(2)
    conv = model.features[0]
    group = PrunableGroup(names=(NAME,), convs=(conv,))
    spy = _WholeClassSpy()
    score_group(model, group, spy, source)
    assert spy.sizes == [7, 7, 7]
    spy.whole_class = False
    score_group(model, group, spy, replace(source, chunk_bytes=2 * PER_IMAGE))
    assert spy.sizes == [1, 2, 2, 2] * 3
