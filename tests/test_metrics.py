"""Evaluation metrics on hand-made cases."""

import math

import pytest
import torch

from finetune.metrics import (
    balanced_accuracy,
    class_metrics,
    confusion_matrix,
    one_vs_rest_balanced_accuracy,
    summarize,
)
from finetune.schedule import step_lr, warmup_cosine_lr


def test_balanced_accuracy_is_mean_recall():
    confusion = torch.tensor([[8, 2, 0], [1, 1, 0], [0, 0, 0]])  # class 2 has no images
    assert balanced_accuracy(confusion) == pytest.approx((0.8 + 0.5) / 2)


def test_one_vs_rest_balanced_accuracy_by_hand():
    confusion = torch.tensor([[8, 2, 0], [1, 1, 0], [3, 0, 5]])
    # class 0: TP 8, FN 2, FP 4, TN 6 → (0.8 + 0.6) / 2
    assert one_vs_rest_balanced_accuracy(confusion, 0) == pytest.approx(0.7)


def test_summarize_topk_and_loss():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = torch.tensor([1, 0])
    ev = summarize(logits, labels)
    assert ev.top1 == 0.0
    assert ev.top5 == 0.5  # label 1 is 2nd for image 0; label 0 is 6th for image 1
    expected_loss = -(torch.log_softmax(logits, 1)[0, 1] + torch.log_softmax(logits, 1)[1, 0]) / 2
    assert ev.loss == pytest.approx(float(expected_loss))


def test_paper_schedule():
    assert [step_lr(1e-3, e) for e in range(3)] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert math.isclose(step_lr(0.1, 2, decay=0.5), 0.025)


def test_confusion_matrix_and_class_metrics_by_hand():
    # rows = true class: class 0 → 8 right, 2 as class 1; class 1 → 1 as 0, 1 right; class 2 → 3 as 0, 5 right
    pairs = [(0, 0)] * 8 + [(0, 1)] * 2 + [(1, 0)] + [(1, 1)] + [(2, 0)] * 3 + [(2, 2)] * 5
    labels = torch.tensor([t for t, _ in pairs])
    predictions = torch.tensor([p for _, p in pairs])
    assert confusion_matrix(predictions, labels, 3).tolist() == [[8, 2, 0], [1, 1, 0], [3, 0, 5]]
    logits = torch.nn.functional.one_hot(predictions, 3).float()
    # class 0: TP 8, FN 2, FP 4, TN 6 → (0.8 + 0.6) / 2
    assert class_metrics(logits, labels, 0)["balanced_accuracy"] == pytest.approx(0.7)
    # class 2: TP 5, FN 3, FP 0, TN 12 → (5/8 + 1) / 2; its accuracy is its recall
    metrics = class_metrics(logits, labels, 2)
    assert metrics["balanced_accuracy"] == pytest.approx((5 / 8 + 1) / 2)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert summarize(logits, labels).balanced_accuracy == pytest.approx((0.8 + 0.5 + 5 / 8) / 3)


def test_top1_takes_the_lowest_index_among_tied_logits():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0] * 5])
    assert summarize(logits, torch.tensor([1, 0])).top1 == 1.0
    assert summarize(logits, torch.tensor([2, 4])).top1 == 0.0


def test_warmup_cosine_schedule_by_hand():
    lrs = [warmup_cosine_lr(s, total=6, warmup=2, base=0.4) for s in range(6)]
    # warm-up 0.2, 0.4; then 0.4·(1 + cos(π·k/4))/2 for k = 0..3
    expected = [0.2, 0.4, 0.4, 0.2 * (1 + math.sqrt(0.5)), 0.2, 0.2 * (1 - math.sqrt(0.5))]
    assert lrs == pytest.approx(expected)
