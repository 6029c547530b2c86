"""Fine-tuning's checkpoint/resume (finetune.checkpoint through finetune.train.finetune's `checkpoint=`)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.checkpoint import state_dict_mismatch
from finetune.train import FinetuneConfig, finetune


class MemoryFile:
    """A CheckpointFile in memory; counts the writes."""

    def __init__(self, state: dict | None = None) -> None:
        self.state, self.writes = state, 0

    def read(self) -> dict | None:
        return copy.deepcopy(self.state)

    def write(self, state: dict) -> None:
        self.state, self.writes = copy.deepcopy(state), self.writes + 1


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 6, generator=g), torch.randint(3, (24,), generator=g))
    return DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator())


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _tune(model: nn.Module, epochs: int, file: MemoryFile | None) -> list[float]:
    config = FinetuneConfig(epochs=epochs, lr=0.1)
    return finetune(model, _loader(), config=config, quiet=True, seed=3, checkpoint=file)


def test_an_interrupted_fine_tuning_resumes_to_the_uninterrupted_result() -> None:
    whole = _model()
    losses = _tune(whole, 4, None)
    file = MemoryFile()
    first = _tune(_model(), 2, file)  # "interrupted" after epoch 1 (0-based)
    assert file.writes == 2 and file.state["epoch"] == 1 and file.state["losses"] == first == losses[:2]
    assert set(file.state) == {"epoch", "losses", "model", "optimizer"}
    resumed = _model()
    assert _tune(resumed, 4, file) == losses  # the losses of every epoch, the resumed ones included
    assert file.writes == 4 and file.state["epoch"] == 3
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_that_does_not_fit_is_ignored() -> None:
    reference = _tune(_model(), 2, None)
    foreign = {"epoch": 0, "losses": [9.0], "model": nn.Linear(2, 2).state_dict(), "optimizer": {}}
    no_optimizer = {"epoch": 0, "losses": [9.0], "model": _model().state_dict()}
    for state in (foreign, no_optimizer):
        assert _tune(_model(), 2, MemoryFile(state)) == reference


def test_state_dict_mismatch_names_the_first_problem() -> None:
    model = _model()
    assert state_dict_mismatch(model, model.state_dict()) is None
    assert state_dict_mismatch(model, [1]) == "it holds a list, not a state_dict"
    state = model.state_dict()
    state["0.weight"] = torch.zeros(2, 2)
    assert "key '0.weight' has shape (2, 2)" in state_dict_mismatch(model, state)
