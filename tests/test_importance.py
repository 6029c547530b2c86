"""prune.as_tp_importance: a registered scorer inside torch-pruning's own pruners."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

import prune
import scoring
from prune.errors import UsageError
from prune.pipeline.importance import normalize_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def images_and_labels(classes: int = 3, per_class: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(classes * per_class, 3, size, size, generator=g), torch.arange(classes).repeat_interleave(per_class)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_twice(importance) -> tuple[nn.Module, list, list[int]]:
    """resnet18 pruned by MetaPruner in 2 steps to ratio 0.3; (model, history, params after each step)."""
    model = resnet18()
    x, _ = images_and_labels()
    pruner = tp.pruner.MetaPruner(
        model, x[:1], importance=importance, iterative_steps=2, pruning_ratio=0.3, ignored_layers=[model.fc]
    )
    sizes = [params(model)]
    for _ in range(2):
        pruner.step()
        sizes.append(params(model))
    return model, pruner.DG.pruning_history(), sizes


def test_entropy_drives_metapruner_on_resnet18():
    x, y = images_and_labels()
    entropy = prune.as_tp_importance("entropy", images=x, labels=y)
    lengths: list[int] = []

    def recording(group):
        scores = entropy(group)
        lengths.append(len(scores))
        assert len(scores) == len(group[0].idxs) and torch.isfinite(scores).all()
        return scores

    model, history, sizes = prune_twice(recording)
    assert sizes[0] > sizes[1] > sizes[2]
    assert model.conv1.out_channels == int(64 * (1 - 0.3)) and model.fc.out_features == 3
    with torch.no_grad():
        assert model(x).shape == (12, 3)
    # the second step scored the network as the first step left it
    half = len(lengths) // 2
    assert sum(lengths[half:]) < sum(lengths[:half])

    _, magnitude_history, magnitude_sizes = prune_twice(tp.importance.MagnitudeImportance(p=1))
    assert magnitude_sizes[-1] == sizes[-1]  # same budget ...
    removed = {name: set(idxs) for name, _, idxs in history}
    removed_by_magnitude = {name: set(idxs) for name, _, idxs in magnitude_history}
    assert removed["conv1"] != removed_by_magnitude["conv1"]  # ... different channels


def test_l1_ranks_like_the_registry_on_a_plain_conv_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 5, 3)).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 8, 8))
    conv = model[0]
    direct = scoring.create("l1")(scoring.LayerSpec(model=model, conv=conv, name="0"))

    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(12)))
    raw = prune.as_tp_importance("l1", images=None, labels=None, normalize=None)(group)
    assert torch.allclose(raw, direct)
    normalized = prune.as_tp_importance("l1", images=None, labels=None)(group)
    assert torch.equal(torch.argsort(normalized), torch.argsort(direct))

    subset = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[2, 6, 9])
    assert torch.allclose(prune.as_tp_importance("l1", images=None, labels=None, normalize=None)(subset), direct[[2, 6, 9]])


def test_a_residual_group_scores_the_mean_of_its_convs():
    model = resnet18()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 64, 64))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(64)))
    members = [model.conv1, model.layer1[0].conv2, model.layer1[1].conv2]
    expected = torch.stack([m.weight.detach().abs().sum(dim=(1, 2, 3)) for m in members]).mean(dim=0)
    scores = prune.as_tp_importance("l1", images=None, labels=None, normalize=None)(group)
    assert torch.allclose(scores, expected, rtol=1e-5)


def test_scoring_leaves_the_model_mode_and_statistics_alone():
    x, y = images_and_labels(per_class=2, size=16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 14 * 14, 3))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    model.train()
    stats = model[1].running_mean.clone()
    scores = prune.as_tp_importance("apoz", images=x, labels=y)(group)
    assert scores.shape == (6,)
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, stats)


def test_a_group_without_conv_outputs_is_left_to_torch_pruning():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 2, 2))
    group = graph.get_pruning_group(model[1], tp.prune_linear_out_channels, idxs=list(range(6)))
    assert prune.as_tp_importance("l1", images=None, labels=None)(group) is None


@pytest.mark.parametrize("how", ["mean", "max", "gaussian", "standarization"])
def test_normalizers_keep_the_order_for_negative_scores(how):
    scores = torch.tensor([-3.0, -0.5, -2.0, -1.0])  # like entropy's −H
    out = normalize_scores(scores, how)
    assert torch.equal(torch.argsort(out), torch.argsort(scores))
    if how == "gaussian":
        assert abs(float(out.mean())) < 1e-6 and abs(float(out.std()) - 1) < 1e-6
    if how == "standarization":
        assert torch.allclose(out, torch.tensor([0.0, 1.0, 0.4, 0.8]))  # (s − min) / (max − min) by hand
    if how == "max":
        assert float(out.abs().max()) == pytest.approx(1.0)


def test_normalizers_match_torch_prunings_own():
    """The same name gives the same values as torch-pruning's importance normaliser."""
    import torch_pruning as tp

    scores = torch.tensor([0.3, 2.0, 1.1, 0.7, 1.6])
    lib = tp.importance.GroupMagnitudeImportance()
    for how in ("gaussian", "standarization", "max"):
        assert torch.allclose(normalize_scores(scores, how), lib._normalize(scores, how), atol=1e-4), how


def test_constant_scores_standardize_to_zero():
    assert torch.equal(normalize_scores(torch.full((5,), 2.5), "gaussian"), torch.zeros(5))


def test_the_old_name_still_works_with_a_deprecation_warning():
    scores = torch.tensor([0.3, 2.0, 1.1])
    with pytest.warns(DeprecationWarning, match="gaussian"):
        old = normalize_scores(scores, "standardize")
    assert torch.equal(old, normalize_scores(scores, "gaussian"))


def test_bad_arguments_are_usage_errors():
    x, y = images_and_labels(per_class=2, size=16)
    with pytest.raises(UsageError, match="needs data"):
        prune.as_tp_importance("entropy", images=None, labels=None)
    with pytest.raises(UsageError, match="one label per image"):
        prune.as_tp_importance("entropy", images=x, labels=y[:-1])
    with pytest.raises(UsageError, match="normalize"):
        prune.as_tp_importance("l1", images=None, labels=None, normalize="zscore")
    with pytest.raises(UsageError, match="known scorers"):
        prune.as_tp_importance("entropyy", images=x, labels=y)
