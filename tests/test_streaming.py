"""Streaming units: the pipeline gives a scorer each class in chunks of images, bounded by
`ScoringData.chunk_bytes`, and the scores equal one update per whole class (bitwise)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch
from helpers import small_data

import scoring
from prune.pipeline.observe import iter_units
from prune.pipeline.selection import ScoringData, class_batches, score_group, update_with_class
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


def test_a_scorer_that_reads_no_units_gets_whole_classes_of_images_and_no_forward() -> None:
    model, source = setup(2)
    conv = model.features[0]
    forwards: list[int] = []
    conv.register_forward_hook(lambda *_: forwards.append(1))
    spy = _WholeClassSpy()
    spy.whole_class, spy.reads_units = False, False
    shapes: list[tuple[int, ...]] = []
    spy.update = lambda batch: shapes.append((batch.images.shape[0], *batch.activations.shape))
    score_group(model, PrunableGroup(names=(NAME,), convs=(conv,)), spy, source)
    assert shapes == [(7, 7, 0, 0, 0)] * 3 and not forwards


class _SlowSpy(scoring.Scorer):
    """Records when each update ran and on which thread; each update takes 50 ms."""

    info = scoring.ScorerInfo("slow-spy", needs_data=True, description="test")
    reads_only_units = True

    def reset(self, layer: scoring.LayerSpec) -> None:
        super().reset(layer)
        self.spans: list[tuple[float, float, str, int]] = []

    def update(self, batch: scoring.ClassBatch) -> None:
        start = time.perf_counter()
        time.sleep(0.05)
        if batch.activations.shape[0] == 0:
            raise ValueError("empty")
        self.spans.append((start, time.perf_counter(), threading.current_thread().name, batch.images.shape[0]))

    def compute(self) -> torch.Tensor:
        return torch.zeros(self.layer.num_channels)


class _WaitingSpy(_SlowSpy):
    """Each update but the last of a class waits (up to 10 s) until the next chunk's forward has
    begun, and records whether it saw it: run in turn, an update could never see it."""

    def __init__(self, chunks: int, forward_began: threading.Condition, forwards: list[float]) -> None:
        super().__init__()
        self.chunks, self.forward_began, self.forwards = chunks, forward_began, forwards
        self.saw_next_forward: list[bool] = []

    def update(self, batch: scoring.ClassBatch) -> None:
        i = len(self.saw_next_forward)
        with self.forward_began:
            seen = i + 1 == self.chunks or self.forward_began.wait_for(lambda: len(self.forwards) >= i + 2, timeout=10)
        self.saw_next_forward.append(seen)
        super().update(batch)


def test_updates_run_beside_the_next_forward_in_order() -> None:
    model, source = setup(2)  # chunks of 1 + 2 + 2 + 2 images per class
    conv = model.features[0]
    forwards: list[float] = []
    forward_began = threading.Condition()

    def began(*_: object) -> None:
        with forward_began:
            forwards.append(time.perf_counter())
            forward_began.notify_all()

    handle = conv.register_forward_pre_hook(began)
    spy = _WaitingSpy(4, forward_began, forwards)
    spy.reset(scoring.LayerSpec(model=model, conv=conv, name=NAME))
    try:
        update_with_class(spy, spy.layer, source, 2)
    finally:
        handle.remove()
    assert [n for *_, n in spy.spans] == [1, 2, 2, 2]
    assert all(name.startswith("topoprune-score") for _, _, name, _ in spy.spans)
    assert all(a[1] <= b[0] for a, b in zip(spy.spans, spy.spans[1:]))  # one update at a time, in order
    # each update saw the next chunk's forward begin while it ran (in turn, it would wait in vain)
    assert len(forwards) == 4 and spy.saw_next_forward == [True] * 4
    assert not any(t.name.startswith("topoprune-score") for t in threading.enumerate())


@pytest.mark.parametrize("name", ["entropy", "apoz", "hrank"])
def test_overlapped_updates_give_the_scores_of_plain_ones(name: str) -> None:
    model, source = setup(2)
    layer = scoring.LayerSpec(model=model, conv=model.features[0], name=NAME)
    scores = []
    for overlap in (False, True):
        scorer = scoring.create(name)
        scorer.reset(layer)
        for cls in source.classes:
            update_with_class(scorer, layer, source, cls, overlap=overlap)
        scores.append(scorer.compute())
    assert torch.equal(scores[0], scores[1])


def test_an_update_that_fails_fails_the_class() -> None:
    model, source = setup(2)
    spy = _SlowSpy()
    spy.reset(scoring.LayerSpec(model=model, conv=model.features[0], name=NAME))
    spy.update = lambda batch: (_ for _ in ()).throw(ValueError("broken update"))
    with pytest.raises(ValueError, match="broken update"):
        update_with_class(spy, spy.layer, source, 0, overlap=True)
    workers = [t for t in threading.enumerate() if t.name.startswith("topoprune-score")]
    for t in workers:
        t.join(timeout=10)  # the worker is let go without waiting; it ends by itself
    assert not any(t.is_alive() for t in workers)


class _ModelRan(Exception):
    """Raised by a forward hook: something ran the model."""


def _forward_refused(*_: object) -> None:
    raise _ModelRan


@pytest.mark.parametrize("name", scoring.list_scorers())
def test_a_scorer_that_reads_only_units_never_runs_the_model(name: str) -> None:
    model, source = setup(2)
    conv = model.features[0]
    batches = list(class_batches(model, conv, NAME, source))
    scorer = scoring.create(name)
    scorer.reset(scoring.LayerSpec(model=model, conv=conv, name=NAME))
    handles = [m.register_forward_pre_hook(_forward_refused) for m in model.modules()]
    try:
        for batch in batches:  # what runs on the worker thread
            scorer.update(batch)
        ran_model = False
    except _ModelRan:
        ran_model = True
    finally:
        for h in handles:
            h.remove()
    assert not (ran_model and scorer.reads_only_units)
