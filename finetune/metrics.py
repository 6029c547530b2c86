"""Evaluation metrics: top-k accuracy, balanced accuracy, loss (from a confusion matrix)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.batches import Batches


@dataclass(frozen=True)
class Evaluation:
    """top1/top5/balanced_accuracy in [0, 1]; loss = mean cross-entropy; n = images."""

    top1: float
    top5: float
    balanced_accuracy: float
    loss: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """The five fields as a plain dict {field: value}."""
        return asdict(self)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [K, K] (int64) of predicted classes [N] against true labels [N]; rows = true class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean per-class recall of a confusion matrix [K, K] (rows = true class).

    Classes with no images are left out of the mean.
    """
    support = confusion.sum(dim=1)
    present = support > 0
    recall = confusion.diagonal()[present].double() / support[present].double()
    return float(recall.mean()) if len(recall) else 0.0


def one_vs_rest_balanced_accuracy(confusion: torch.Tensor, cls: int) -> float:
    """Balanced accuracy of class `cls` against the rest: (recall + true-negative rate) / 2."""
    c = confusion.double()
    tp = c[cls, cls]
    fn = c[cls].sum() - tp
    fp = c[:, cls].sum() - tp
    tn = c.sum() - tp - fn - fp
    recall = tp / (tp + fn) if tp + fn > 0 else torch.tensor(0.0)
    tnr = tn / (tn + fp) if tn + fp > 0 else torch.tensor(0.0)
    return float((recall + tnr) / 2)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Batches, *, device: torch.device | str = "cpu", quiet: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, K] (float32, CPU) and labels [N] for every image of `loader` (a DataLoader
    or any iterable of (images, labels) batches, e.g. `finetune.batches.in_order`), in eval mode."""
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, desc="evaluate", disable=quiet, leave=False):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def summarize(logits: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """Metrics from logits [N, K] and labels [N]; the top-1 prediction is the argmax (the
    lowest class index among tied logits)."""
    k = logits.shape[1]
    predictions = logits.argmax(dim=1)
    top = logits.topk(min(5, k), dim=1).indices
    return Evaluation(
        top1=float((predictions == labels).float().mean()),
        top5=float((top == labels[:, None]).any(dim=1).float().mean()),
        balanced_accuracy=balanced_accuracy(confusion_matrix(predictions, labels, k)),
        loss=float(nn.functional.cross_entropy(logits, labels)),
        n=len(labels),
    )


def class_metrics(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> dict[str, float]:
    """For class `cls`: accuracy and mean cross-entropy on its images (NaN if none), and its
    one-vs-rest balanced accuracy over all images; logits [N, K], labels [N]."""
    own = labels == cls
    acc = float((logits[own].argmax(1) == cls).float().mean()) if own.any() else float("nan")
    loss = float(nn.functional.cross_entropy(logits[own], labels[own])) if own.any() else float("nan")
    confusion = confusion_matrix(logits.argmax(dim=1), labels, logits.shape[1])
    return {"accuracy": acc, "loss": loss, "balanced_accuracy": one_vs_rest_balanced_accuracy(confusion, cls)}


def evaluate(
    model: nn.Module, loader: Batches, *, device: torch.device | str = "cpu", quiet: bool = True
) -> Evaluation:
    """Top-1, top-5, balanced accuracy and loss of `model` on `loader`."""
    return summarize(*predict(model, loader, device=device, quiet=quiet))
