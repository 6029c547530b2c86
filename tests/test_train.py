"""The one training loop (finetune.train.fit) and in-memory batches (finetune.batches)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.batches import Shuffled, in_order
from finetune.train import fit


def _data(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(3, (n,), generator=g)


def test_shuffled_gives_a_new_permutation_every_pass() -> None:
    images, labels = torch.arange(10.0).view(10, 1), torch.arange(10)
    batches = Shuffled(images, labels, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert len(batches) == 3
    passes = [torch.cat([y for _, y in batches]) for _ in range(2)]
    assert [len(y) for _, y in batches] == [4, 4, 2]
    for order in passes:
        assert sorted(order.tolist()) == list(range(10))
    assert not torch.equal(passes[0], passes[1])
    again = Shuffled(images, labels, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([y for _, y in again]), passes[0])
    for x, y in Shuffled(images, labels, batch_size=3, generator=torch.Generator()):
        assert torch.equal(x.view(-1).long(), y)  # images travel with their labels


def test_in_order_batches_are_consecutive() -> None:
    images, labels = _data(10)
    batches = in_order(images, labels, batch_size=4)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), images)


def test_fit_sets_the_scheduled_lr_before_every_step_and_calls_back_in_order() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    images, labels = _data(10)
    seen: list[tuple[int, int, float]] = []
    events: list[str] = []
    original_step = optimizer.step

    def step(*args, **kwargs):
        seen[-1] = (*seen[-1][:2], optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    optimizer.step = step

    def lr(epoch: int, batch: int) -> float:
        seen.append((epoch, batch, float("nan")))
        return 0.01 * (10 * epoch + batch + 1)

    losses = fit(
        model, in_order(images, labels, batch_size=4), optimizer, epochs=3, start_epoch=1, lr=lr,
        on_epoch_start=lambda e: events.append(f"start {e} {model.training}"),
        on_epoch_end=lambda e, loss: events.append(f"end {e} {model.training}"), quiet=True,
    )
    assert [(e, b) for e, b, _ in seen] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert [v for _, _, v in seen] == pytest.approx([0.01 * (10 * e + b + 1) for e, b, _ in seen])
    assert events == ["start 1 True", "end 1 False", "start 2 False", "end 2 False"]  # a new module trains
    assert len(losses) == 2 and not model.training


def test_fit_loss_is_the_mean_over_images_and_zero_lr_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _data(10)  # batches of 4, 4, 2: a plain mean of batch means would differ
    (loss,) = fit(model, in_order(images, labels, batch_size=4), torch.optim.SGD(model.parameters(), lr=0.0),
                  epochs=1, lr=lambda _e, _b: 0.0, quiet=True)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(images), labels)
    assert loss == pytest.approx(float(expected), rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_is_deterministic_and_augment_sees_every_batch() -> None:
    images, labels = _data(12)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
        gen = torch.Generator().manual_seed(3)
        sizes: list[int] = []

        def augment(x: torch.Tensor) -> torch.Tensor:
            sizes.append(len(x))
            return x + 0.1 * torch.randn(x.shape, generator=gen)

        fit(model, Shuffled(images, labels, batch_size=5, generator=gen), torch.optim.SGD(model.parameters(), lr=0.1),
            epochs=2, lr=lambda _e, _b: 0.1, augment=augment, quiet=True)
        runs.append(model.state_dict())
        assert sizes == [5, 5, 2, 5, 5, 2]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
