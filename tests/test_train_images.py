"""`--train-images N`: fine-tuning on a fixed, class-balanced subset of the train split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import prune
from prune.errors import UsageError
from prune.zoo.data import balanced_subset


def test_subset_is_balanced_fixed_and_sorted() -> None:
    targets = tuple([0] * 50 + [1] * 30 + [2] * 20)
    chosen = balanced_subset(targets, 31, classes=3)
    assert chosen == sorted(chosen) and len(set(chosen)) == 31
    assert Counter(targets[i] for i in chosen) == {0: 11, 1: 10, 2: 10}
    assert balanced_subset(targets, 31, classes=3) == chosen  # the same every time, no seed involved


@pytest.mark.parametrize(("n", "match"), [(0, "1..100"), (101, "1..100"), (70, "class 2")])
def test_impossible_subsets_name_the_fix(n: int, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        balanced_subset(tuple([0] * 50 + [1] * 30 + [2] * 20), n, classes=3)


def test_main_job_refuses_too_many_before_writing(tmp_path: Path) -> None:
    config = prune.PruneConfig(classes=2, samples_per_class=2, epochs=1, train_images=10**6)
    with pytest.raises(UsageError, match="--train-images"):
        prune.run(config, out=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_main_job_fine_tunes_on_the_subset(tmp_path: Path) -> None:
    """Fine-tuning on 20 images takes one batch of 20 per epoch (batch size 64): its loss is that batch's."""
    config = prune.PruneConfig(classes=2, samples_per_class=2, epochs=1, train_images=20, ratio=0.25, scorer="l1")
    report = prune.run(config, out=tmp_path / "out", quiet=True)
    assert len(report.finetune_losses) == 1 and report.settings.train_images == 20
