"""BatchNorm recalibration after pruning."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.batchnorm import recalibrate_batchnorm


def test_running_stats_become_the_average_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    x = torch.randn(16, 3, 6, 6) * 3 + 1
    loader = DataLoader(TensorDataset(x, torch.zeros(16)), batch_size=8)
    weights = model[0].weight.clone()
    used = recalibrate_batchnorm(model, loader, batches=2, device="cpu")
    assert used == 16
    with torch.no_grad():
        conv = model[0](x)
    halves = conv.split(8)
    mean = torch.stack([h.mean(dim=(0, 2, 3)) for h in halves]).mean(0)
    var = torch.stack([h.var(dim=(0, 2, 3), unbiased=True) for h in halves]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.1 and not model.training
    assert torch.equal(model[0].weight, weights)


def test_zero_batches_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 2, 2), torch.zeros(4)), batch_size=2)
    assert recalibrate_batchnorm(model, loader, batches=0, device="cpu") == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
