"""torch-pruning's criteria as scorers (`scoring/tp_importances.py`) against independent computations.

Expected values follow torch-pruning 1.6.0's definitions (group_reduction "mean" over the
coupled slices: the conv's filters, its BatchNorm γ, the next conv's input channels), written
here as loops over channels and plain autograd, never by calling torch-pruning.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import prune
from prune.cli import main
from scoring import ClassBatch, LayerSpec, create, list_scorers, scorer_info

pytestmark = pytest.mark.usefixtures("one_thread")

TP = ["tp-bnscale", "tp-fpgm", "tp-hessian", "tp-lamp", "tp-magnitude", "tp-taylor"]


def chain(seed: int = 0) -> nn.Sequential:
    """Conv(3→4), BN(4) with γ = (0.5, −1.5, 2, 0.25), ReLU, Conv(4→5), ReLU, mean pool, Linear(5→3)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -1.5, 2.0, 0.25]))
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def batches(classes: int = 3, n: int = 4, seed: int = 1) -> list[ClassBatch]:
    """One ClassBatch of n 6×6 images per class (activations unused by these scorers)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        ClassBatch(k, torch.randn(n, 3, 6, 6, generator=gen) + 0.2 * k, torch.zeros(n, 4, 6, 6))
        for k in range(classes)
    ]


def layer(net: nn.Sequential) -> LayerSpec:
    return LayerSpec(model=net, conv=net[0], name="0", example=torch.zeros(1, 3, 6, 6))


def group_mean(*per_slice: list[float]) -> torch.Tensor:
    """Mean over the group's slices of per-channel values."""
    return torch.tensor([sum(v) / len(v) for v in zip(*per_slice)], dtype=torch.float32)


def filter_sums(values: torch.Tensor) -> list[float]:
    """Σ over each output filter of [C, ...] → [C]."""
    return [float(values[c].sum()) for c in range(values.shape[0])]


def in_channel_sums(values: torch.Tensor) -> list[float]:
    """Σ over each input channel of a conv weight-shaped [C_out, C, k, k] → [C]."""
    return [float(values[:, c].sum()) for c in range(values.shape[1])]


def mean_ce_gradients(net: nn.Module, data: list[ClassBatch]) -> dict[str, torch.Tensor]:
    """∂/∂θ of the mean cross-entropy over every image, labels = its batch's class."""
    images = torch.cat([b.images for b in data])
    labels = torch.cat([torch.full((len(b.images),), b.class_index) for b in data])
    names, params = zip(*net.named_parameters())
    return dict(zip(names, torch.autograd.grad(F.cross_entropy(net(images), labels), params)))


def mean_squared_gradients(net: nn.Module, data: list[ClassBatch]) -> dict[str, torch.Tensor]:
    """Mean over images of (∂CE_i/∂θ)², one image at a time."""
    names, params = zip(*net.named_parameters())
    sums = [torch.zeros_like(p) for p in params]
    count = 0
    for b in data:
        for image in b.images:
            loss = F.cross_entropy(net(image[None]), torch.tensor([b.class_index]))
            for s, g in zip(sums, torch.autograd.grad(loss, params)):
                s += g**2
            count += 1
    return {n: s / count for n, s in zip(names, sums)}


# ---------------------------------------------------------------- registry


def test_registered_with_data_only_for_the_gradient_criteria() -> None:
    assert set(TP) <= set(list_scorers("tp-*"))
    assert {n for n in TP if scorer_info(n).needs_data} == {"tp-taylor", "tp-hessian"}
    assert create("tp-taylor").shardable() and create("tp-hessian").shardable()


# ---------------------------------------------------------------- weight criteria


def test_magnitude_is_the_group_mean_of_squared_weights() -> None:
    net = chain()
    w1, gamma, w2 = net[0].weight.detach(), net[1].weight.detach(), net[3].weight.detach()
    expected = group_mean(filter_sums(w1**2), (gamma**2).tolist(), in_channel_sums(w2**2))
    torch.testing.assert_close(create("tp-magnitude")(layer(net)), expected)


def test_lamp_divides_by_the_sum_of_the_magnitudes_not_smaller() -> None:
    net = chain()
    w1, gamma, w2 = net[0].weight.detach(), net[1].weight.detach(), net[3].weight.detach()
    s = group_mean(filter_sums(w1**2), (gamma**2).tolist(), in_channel_sums(w2**2)).tolist()
    expected = torch.tensor([s[c] / sum(v for v in s if v >= s[c]) for c in range(4)])
    got = create("tp-lamp")(layer(net))
    torch.testing.assert_close(got, expected)
    assert torch.equal(torch.argsort(got), torch.argsort(torch.tensor(s)))


def test_fpgm_is_the_group_mean_of_distances_between_squared_slices() -> None:
    net = chain()
    a = (net[0].weight.detach() ** 2).reshape(4, -1)  # conv out: filter c
    b = (net[3].weight.detach() ** 2).transpose(0, 1).reshape(4, -1)  # next conv: input channel c

    def distance_sums(x: torch.Tensor) -> list[float]:
        return [sum(math.dist(x[i].tolist(), x[j].tolist()) for j in range(4)) for i in range(4)]

    torch.testing.assert_close(create("tp-fpgm")(layer(net)), group_mean(distance_sums(a), distance_sums(b)))


def test_fpgm_squares_and_sums_large_slices_in_chunks_as_torch_pruning_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conv whose group holds a Linear over its flattened 4 × 6 × 6 = 144 inputs: with the chunked
    path forced (more than CDIST_ROWS = 16 rows, chunks of 10 rows) the scores equal the hand-computed
    distance sums and torch-pruning's own FPGMImportance; unforced, they equal it bit for bit."""
    from scoring import tp_importances

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    spec = LayerSpec(model=net, conv=net[0], name="0", example=torch.zeros(1, 3, 6, 6))
    group = tp_importances.pruning_group(spec, spec.example)
    expected = tp.importance.FPGMImportance(normalizer=None)(group)
    assert torch.equal(tp_importances._Bounded("FPGMImportance", normalizer=None)(group), expected)
    monkeypatch.setattr(tp_importances, "CDIST_ROWS", 16)
    monkeypatch.setattr(tp_importances, "CHUNK_BYTES", 10 * 144 * 4)
    got = create("tp-fpgm")(spec)
    a = (net[0].weight.detach() ** 2).reshape(4, -1)
    b = (net[3].weight.detach() ** 2).transpose(0, 1)  # [144, 3]: Linear input i = channel i // 36

    def column_sums(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([sum(math.dist(x[i].tolist(), x[j].tolist()) for i in range(len(x))) for j in range(len(x))])

    by_channel = column_sums(b).reshape(4, 36).sum(dim=1)  # scatter-added onto the 4 root channels
    torch.testing.assert_close(got, (column_sums(a) + by_channel).float() / 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=0)


def test_fpgm_reads_a_grouped_convs_input_channel_as_its_own_groups_filters() -> None:
    """Conv(3→4) feeding a Conv(4→6, groups=2) (ResNeXt's consumer, where torch-pruning 1.6.0
    raises): input channel c of group q = c // 2 is read by filters 3q…3q+2 only; scores = the
    group mean of the hand-computed distance sums of the conv's filters and of those rows."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2)).eval()
    w1, w2 = net[0].weight.detach() ** 2, net[2].weight.detach() ** 2  # [4, 3, 3, 3], [6, 2, 3, 3]
    filters = [w1[c].flatten().tolist() for c in range(4)]
    inputs = [w2[3 * (c // 2):3 * (c // 2) + 3, c % 2].flatten().tolist() for c in range(4)]

    def distance_sums(rows: list[list[float]]) -> list[float]:
        return [sum(math.dist(rows[i], rows[j]) for i in range(len(rows))) for j in range(len(rows))]

    spec = LayerSpec(model=net, conv=net[0], name="0", example=torch.zeros(1, 3, 6, 6))
    torch.testing.assert_close(create("tp-fpgm")(spec), group_mean(distance_sums(filters), distance_sums(inputs)),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("criterion, options", [("GroupMagnitudeImportance", {"p": 2, "normalizer": None}),
                                                ("LAMPImportance", {"p": 2}),
                                                ("GroupTaylorImportance", {"normalizer": None}),
                                                ("GroupTaylorImportance", {"normalizer": None, "multivariable": True}),
                                                ("GroupHessianImportance", {"normalizer": None})])
def test_weight_criteria_of_large_slices_in_chunks_equal_torch_prunings_bit_for_bit(
        criterion: str, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conv → BatchNorm → conv → Linear net with every slice forced "large" (chunks of 3 rows):
    the chunked row sums (of |w|², of |w·g|) give torch-pruning's own scores exactly, for the conv's
    group and the last's."""
    from scoring import tp_importances

    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 3)).eval()
    monkeypatch.setattr(tp_importances, "CHUNK_BYTES", 3 * 8 * 9 * 4)
    for param in net.parameters():
        param.grad = torch.randn_like(param)  # what Taylor reads
    for conv in (net[0], net[3]):
        spec = LayerSpec(model=net, conv=conv, name="c", example=torch.zeros(1, 3, 5, 5))
        group = tp_importances.pruning_group(spec, spec.example)
        assert any(tp_importances._large_magnitude(tp.importance.GroupMagnitudeImportance(), item.dep.layer,
                                                   item.dep.pruning_fn, item.idxs) is not None for item in group)
        expected = getattr(tp.importance, criterion)(**options)(group)
        assert torch.equal(tp_importances._Bounded(criterion, **options)(group), expected)


@pytest.mark.parametrize("name", ["tp-fpgm", "tp-magnitude", "tp-lamp"])
def test_weight_criteria_skip_a_norm_layer_without_weights_as_torch_pruning_does(name: str) -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1)).eval()
    spec = LayerSpec(model=net, conv=net[0], name="0", example=torch.zeros(1, 3, 6, 6))
    criterion = {"tp-fpgm": "FPGMImportance", "tp-magnitude": "GroupMagnitudeImportance", "tp-lamp": "LAMPImportance"}[name]
    from scoring import tp_importances

    expected = getattr(tp.importance, criterion)(**create(name).options)(tp_importances.pruning_group(spec, spec.example))
    assert torch.equal(create(name)(spec), expected.float())


def test_bnscale_is_the_absolute_batchnorm_scale() -> None:
    net = chain()
    assert create("tp-bnscale")(layer(net)).tolist() == [0.5, 1.5, 2.0, 0.25]


def test_bnscale_check_refuses_a_model_without_batchnorm() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="no(ne)? BatchNorm|has none") as info:
        create("tp-bnscale").check(plain, classes=2, samples_per_class=3)
    assert "\n" not in str(info.value) and "--scorer" in str(info.value)
    normed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2))
    create("tp-bnscale").check(normed.eval(), classes=2, samples_per_class=3)  # accepted


class Excited(nn.Module):
    """Conv → BatchNorm → ReLU, gated by a squeeze-and-excitation pair of 1 × 1 convs (no
    BatchNorm, as in EfficientNet), then a conv head whose output is the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.squeeze, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        gate = torch.sigmoid(self.expand(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.head(h * gate).mean((2, 3))


def test_bnscale_check_names_a_conv_whose_group_holds_no_batchnorm() -> None:
    """The stem's group holds its BatchNorm; the squeeze conv's does not: refused in one line
    naming it. Without the squeeze-and-excitation pair the model is accepted (its head conv, the
    model's output, is never pruned)."""
    net = Excited().eval()
    with pytest.raises(ValueError, match="'squeeze'") as info:
        create("tp-bnscale").check(net, classes=2, samples_per_class=3)
    assert "\n" not in str(info.value) and "--scorer" in str(info.value)
    frozen = Excited().train().requires_grad_(False)  # refused as well, and left in train mode, frozen
    with pytest.raises(ValueError, match="'squeeze'"):
        create("tp-bnscale").check(frozen, classes=2, samples_per_class=3)
    assert all(m.training for m in frozen.modules()) and not any(p.requires_grad for p in frozen.parameters())
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    create("tp-bnscale").check(plain, classes=2, samples_per_class=3)


class WithAuxiliary(nn.Module):
    """Conv → BatchNorm → ReLU → conv head, and an auxiliary BatchNorm-free conv that runs only in
    training mode (as GoogLeNet's and Inception's auxiliary classifiers)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        out = self.head(h).mean((2, 3))
        return out + self.aux(h).mean() if self.training else out


@pytest.mark.parametrize("name", ["tp-bnscale", "thinet"])
def test_checks_read_only_the_convs_a_forward_runs(name: str) -> None:
    create(name).check(WithAuxiliary().eval(), classes=2, samples_per_class=3)  # accepted: aux never runs


def test_bnscale_check_wants_a_batchnorm_with_a_scale() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                        nn.Conv2d(8, 3, 1)).eval()
    with pytest.raises(ValueError, match="'0'"):
        create("tp-bnscale").check(net, classes=2, samples_per_class=3)


def test_weight_criteria_trace_on_a_scoring_image_without_an_example() -> None:
    net = chain()
    without = LayerSpec(model=net, conv=net[0], name="0")
    assert torch.equal(create("tp-magnitude")(without, batches()), create("tp-magnitude")(layer(net)))
    with pytest.raises(ValueError, match="example"):
        create("tp-magnitude")(without)


# ---------------------------------------------------------------- gradient criteria


def test_taylor_is_the_group_mean_of_weight_times_gradient() -> None:
    net, data = chain(), batches()
    with torch.enable_grad():
        g = mean_ce_gradients(net, data)
    w1, w2 = net[0].weight.detach(), net[3].weight.detach()
    # torch-pruning's Taylor sums |w·g| over the conv's filter and the next conv's input
    # channel; its BatchNorm branch tests for GroupNorm, so the BatchNorm γ does not count
    expected = group_mean(filter_sums((w1 * g["0.weight"]).abs()), in_channel_sums((w2 * g["3.weight"]).abs()))
    torch.testing.assert_close(create("tp-taylor")(layer(net), data), expected)


def test_hessian_is_the_group_mean_of_squared_weight_times_squared_gradient() -> None:
    net, data = chain(), batches()
    with torch.enable_grad():
        h = mean_squared_gradients(net, data)
    w1, gamma, w2 = net[0].weight.detach(), net[1].weight.detach(), net[3].weight.detach()
    expected = group_mean(
        filter_sums(w1**2 * h["0.weight"]), (gamma**2 * h["1.weight"]).tolist(), in_channel_sums(w2**2 * h["3.weight"])
    )
    torch.testing.assert_close(create("tp-hessian")(layer(net), data), expected)


@pytest.mark.parametrize("name", ["tp-taylor", "tp-hessian"])
def test_class_shards_merge_to_the_same_scores(name: str) -> None:
    net, data = chain(), batches()
    scorer = create(name)
    whole = scorer(layer(net), data)
    states = []
    for b in data:
        scorer.reset(layer(net))
        scorer.update(b)
        states.append(scorer.state())
    scorer.reset(layer(net))
    scorer.merge(states)
    assert torch.equal(scorer.compute(), whole)


@pytest.mark.parametrize("name", TP)
def test_scoring_leaves_the_model_as_it_was(name: str) -> None:
    net, data = chain(), batches()
    net.train()
    net[3].weight.grad = torch.ones_like(net[3].weight)  # the caller's own gradient
    net[7].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    create(name)(layer(net), data)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # weights and BN statistics
    assert torch.equal(net[3].weight.grad, torch.ones_like(net[3].weight))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "3.weight")
    assert not net[7].weight.requires_grad and net[0].weight.requires_grad


# ---------------------------------------------------------------- everywhere a scorer runs


@pytest.mark.parametrize("model", ["embedded", "embedded-plain"])
def test_main_job_runs_tp_taylor(tmp_path, model: str) -> None:
    out = tmp_path / "out"
    argv = ["--model", model, "--scorer", "tp-taylor", "--classes", "2", "--samples-per-class", "3",
            "--no-finetune", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["scorer"] == "tp-taylor"
    assert report["after"]["params"] < report["before"]["params"]


def test_main_job_refuses_tp_bnscale_without_batchnorm(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["--model", "embedded-plain", "--scorer", "tp-bnscale", "--quiet", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "BatchNorm" in lines[0]
    assert not out.exists()


def test_tp_taylor_drives_metapruner() -> None:
    torch.manual_seed(0)
    net = chain()
    x = torch.randn(6, 3, 6, 6)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    imp = prune.as_tp_importance("tp-taylor", images=x, labels=y, normalize=None)
    group = tp.DependencyGraph().build_dependency(net, example_inputs=x[:1]).get_pruning_group(
        net[0], tp.prune_conv_out_channels, idxs=list(range(4))
    )
    data = [ClassBatch(k, x[y == k], torch.zeros(2, 4, 6, 6)) for k in range(3)]
    torch.testing.assert_close(imp(group), create("tp-taylor")(layer(net), data))
    pruner = tp.pruner.MetaPruner(net, x[:1], importance=imp, pruning_ratio=0.5, ignored_layers=[net[7]])
    pruner.step()
    assert net[0].out_channels == 2 == net[3].in_channels and net[3].out_channels < 5
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        assert net(x).shape == (6, 3)


@pytest.mark.parametrize("name", ["tp-magnitude", "tp-lamp"])
def test_magnitude_counts_a_dead_channels_outgoing_weights(name: str) -> None:
    """Why these two are exempt from the contract's dead-unit test: a channel whose filter,
    bias and γ are 0 (output 0 everywhere) still scores by the next conv's weights on it."""
    net = chain()
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[0].bias[1] = 0.0
        net[1].weight[1] = 0.0
        net[3].weight[:, 1] *= 100.0
    scores = create(name)(layer(net))
    assert scores[1] == scores.max()


@pytest.mark.parametrize("name", ["tp-taylor", "tp-hessian"])
def test_gradient_sums_are_kept_for_the_group_only_with_the_same_scores(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the parameters of the layer's group (conv 0, its BatchNorm, conv 3 that reads it) get
    gradient sums, and the scores equal those from every parameter's gradients, bit for bit."""
    from scoring import tp_importances

    net, data = chain(), batches()
    scorer = create(name)
    scorer.reset(layer(net))
    for b in data:
        scorer.update(b)
    sums, count, _ = scorer.state()
    assert sorted(sums) == ["0.bias", "0.weight", "1.bias", "1.weight", "3.bias", "3.weight"] and count == 12
    scores = create(name)(layer(net), data)
    monkeypatch.setattr(tp_importances.GradientScorer, "group_parameters",
                        lambda self: [n for n, _ in self.layer.model.named_parameters()])
    assert torch.equal(scores, create(name)(layer(net), data))


def test_gradient_passes_are_bounded_by_the_largest_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """tp-taylor's backward holds a pass's activations: with room for 3 images' largest tensor
    (5 channels of 6 × 6 floats) no pass holds more than 3 images, and the scores stay the same
    up to the order of the sums."""
    from scoring import hooks, tp_importances

    net, data = chain(), batches(n=7)
    whole = create("tp-taylor")(layer(net), data)
    monkeypatch.setattr(hooks, "PASS_BYTES", 3 * 5 * 6 * 6 * 4)
    passes: list[int] = []
    handle = net.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    with tp_importances._held(net):
        tp_importances.gradient_sums(net, data[0].images, 0, squared=False, into={})
    handle.remove()
    assert passes == [1, 3, 3, 1]  # one image measured, then 7 = 3 + 3 + 1
    torch.testing.assert_close(create("tp-taylor")(layer(net), data), whole, rtol=1e-5, atol=0)


class TwiceRead(nn.Module):
    """Conv(3→4) → ReLU → flatten (144) → a Linear(144→6) applied to the maps and to their
    negation (one weight, two calls) → ReLU → Linear(6→3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.wide, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(144, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.wide(h) + self.wide(-h)))


def wide_nets() -> dict[str, tuple[nn.Module, nn.Module, nn.Module]]:
    """(network, its conv, the Linear that reads the conv's 144 flattened outputs): once, followed
    by an in-place ReLU, and twice with one weight."""
    torch.manual_seed(6)
    once = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 6),
                         nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    twice = TwiceRead().eval()
    return {"once": (once, once[0], once[3]), "twice": (twice, twice.conv, twice.wide)}


@pytest.mark.parametrize("net_name", ["once", "twice"])
@pytest.mark.parametrize("name", ["tp-taylor", "tp-hessian"])
def test_a_large_linear_weights_gradient_is_summed_in_place_never_formed(
        name: str, net_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Linear's 6 × 144 weight counted large (as VGG16's 4,096 × 25,088), autograd is
    never asked for its gradient, and the scores equal the hand-derived group mean of the conv's
    filters and the Linear's 36 inputs per channel, from plain autograd's mean (squared) gradients."""
    from scoring import tp_importances

    net, conv, wide = wide_nets()[net_name]
    data = [ClassBatch(b.class_index, b.images, b.activations) for b in batches(n=3)]
    with torch.enable_grad():
        grads = (mean_ce_gradients if name == "tp-taylor" else mean_squared_gradients)(net, data)
    names = {id(p): n for n, p in net.named_parameters()}
    g_conv, g_wide = grads[names[id(conv.weight)]], grads[names[id(wide.weight)]]
    if name == "tp-taylor":
        filters, inputs = (conv.weight * g_conv).abs(), (wide.weight * g_wide).abs()
    else:
        filters, inputs = conv.weight**2 * g_conv, wide.weight**2 * g_wide
    expected = (filters.detach().reshape(4, -1).sum(1) + inputs.detach().sum(0).reshape(4, 36).sum(1)) / 2

    monkeypatch.setattr(tp_importances, "CHUNK_BYTES", 6 * 144 * 4 - 1)
    asked: list[bool] = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, **kw: (
        asked.append(any(x is wide.weight for x in inputs)), grad(out, inputs, **kw))[1])
    got = create(name)(LayerSpec(model=net, conv=conv, name="conv", example=torch.zeros(1, 3, 6, 6)), data)
    assert asked and not any(asked)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["tp-taylor", "tp-hessian"])
def test_with_a_large_linear_shards_merge_within_rounding_and_compute_ends_the_sums(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large Linear's weight is summed pass by pass, so class shards merge to the whole run's
    scores within float rounding; after compute() (sums made means in place) an update is refused."""
    from scoring import tp_importances

    monkeypatch.setattr(tp_importances, "CHUNK_BYTES", 6 * 144 * 4 - 1)
    net, conv, _ = wide_nets()["once"]
    spec, data = LayerSpec(model=net, conv=conv, name="conv", example=torch.zeros(1, 3, 6, 6)), batches(n=3)
    scorer = create(name)
    whole = scorer(spec, data)
    with pytest.raises(ValueError, match="reset"):
        scorer.update(data[0])
    states = []
    for b in data:
        scorer.reset(spec)
        scorer.update(b)
        states.append(scorer.state())
    scorer.reset(spec)
    scorer.merge(states)
    torch.testing.assert_close(scorer.compute(), whole, rtol=1e-5, atol=0)


def test_a_tied_or_subclassed_linear_keeps_autograds_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a plain nn.Linear that alone holds its weight takes the in-place path."""
    from scoring import tp_importances

    monkeypatch.setattr(tp_importances, "CHUNK_BYTES", 0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    shared = nn.Sequential(a, b, nn.Linear(4, 2))
    sub = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4), nn.Linear(4, 2))
    assert list(tp_importances._large_linears(shared, {"0.weight", "2.weight"})) == ["2.weight"]
    assert list(tp_importances._large_linears(sub, {"0.weight", "1.weight"})) == ["1.weight"]


def test_gradient_criteria_take_a_bare_parameter_in_the_group() -> None:
    """A per-channel scale kept as a bare nn.Parameter (as ConvNeXt's layer scale) is a node of
    the group of its own: tp-taylor still scores the conv."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.gamma = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
            self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x) * self.gamma)

    torch.manual_seed(0)
    net = Scaled().eval()
    spec = LayerSpec(model=net, conv=net.conv, name="conv", example=torch.zeros(1, 3, 6, 6))
    scores = create("tp-taylor")(spec, batches())
    assert scores.shape == (4,) and torch.isfinite(scores).all()
