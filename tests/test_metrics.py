"""Evaluation metrics on hand-made cases."""

import math

import pytest
import torch

from finetune.metrics import balanced_accuracy, one_vs_rest_balanced_accuracy, summarize
from finetune.schedule import step_lr


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
