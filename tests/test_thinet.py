"""ThiNet's greedy discard order on conv pairs whose right order is derived by hand, its
contributions against the consumer's own output, determinism and seeding, and the one-line
refusal of a layer whose output reaches no conv or linear layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scoring import ClassBatch, LayerSpec, create
from scoring.thinet import Consumer, contributions, discard_order, find_consumers


def conv_pair(first: list[float], second: list[float]) -> nn.Sequential:
    """Conv(3→C, 1×1, no bias) reading input channel 0 with weights `first`, ReLU, Conv(C→1, 1×1,
    no bias) with weights `second`. On a positive input every unit c equals first[c]·x."""
    c = len(first)
    net = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.ReLU(), nn.Conv2d(c, 1, 1, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:, 0, 0, 0] = torch.tensor(first)
        net[2].weight.copy_(torch.tensor(second).reshape(1, c, 1, 1))
    return net


def batches_of(net: nn.Sequential, classes: int = 2, n: int = 3, size: int = 5, seed: int = 0) -> list[ClassBatch]:
    """Positive images (so the ReLU passes everything), one batch per class, units = net[:2]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(classes):
        images = torch.rand(n, 3, size, size, generator=gen) + 0.5
        with torch.no_grad():
            out.append(ClassBatch(k, images, net[:2](images)))
    return out


def layer(net: nn.Module, name: str = "0") -> LayerSpec:
    return LayerSpec(model=net, conv=net.get_submodule(name), name=name)


def test_greedy_order_by_hand() -> None:
    """Units 0, 1, 2, 4 all equal x > 0, unit 3 is dead; the next conv's weights w = (1, −1, 0.8, 5, 0).
    Every sample's contributions are x·w (unit 3: 0), so G = s·w wᵀ with s = Σx² > 0 and removing a
    set T costs s·(Σ_T w)². Dead unit 3 goes first (its weight 5 never counts); then unit 4 (w = 0,
    cost 0); then unit 2 (cost 0.64 against 1 and 1); then, with Σ_T w = 0.8, unit 1 (−1: cost
    0.2² = 0.04) before unit 0 (1: cost 1.8² = 3.24), though |w| ties them. Scores = positions."""
    net = conv_pair([1.0, 1.0, 1.0, 0.0, 1.0], [1.0, -1.0, 0.8, 5.0, 0.0])
    scores = create("thinet")(layer(net), batches_of(net))
    assert scores.tolist() == [4.0, 3.0, 2.0, 0.0, 1.0]


def test_greedy_picks_the_cancelling_channel() -> None:
    """discard_order on Gram matrices by hand. x̂ = (3, −2.9, 1) on one sample: step 1, G_cc = 9, 8.41,
    1 → channel 2; step 2, 2·G_c2 + G_cc = 6 + 9 = 15 for channel 0 and −5.8 + 8.41 = 2.61 for
    channel 1 → channel 1, which cancels channel 2; then channel 0."""
    x = torch.tensor([[3.0, -2.9, 1.0]], dtype=torch.float64)
    assert discard_order(x.T @ x) == [2, 1, 0]
    # two samples where channel 0 and 1 each cancel channel 2 on one sample only
    y = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.5]], dtype=torch.float64)
    g = y.T @ y  # G = [[1, 0, -1], [0, 4, 3], [-1, 3, 3.25]]
    # step 1: diag 1, 4, 3.25 → 0; step 2: channel 1: 0 + 4 = 4, channel 2: −2 + 3.25 = 1.25 → 2
    assert discard_order(g) == [0, 2, 1]
    assert discard_order(g, first=[1]) == [1, 0, 2]  # forced first: then 2·0 + 1 = 1 < 2·3 + 3.25


def test_a_zero_weight_channel_goes_before_every_live_contribution() -> None:
    net = conv_pair([1.0, 0.5, 2.0], [0.3, 0.0, -0.2])
    scores = create("thinet")(layer(net), batches_of(net))
    # contributions 0.3x, 0, −0.4x: unit 1 costs 0, then unit 0 (0.09 s) before unit 2 (0.16 s)
    assert scores.tolist() == [1.0, 0.0, 2.0]


def test_a_dead_unit_is_discarded_first_even_when_its_consumer_input_is_not_zero() -> None:
    """conv → ReLU → BatchNorm (mean 0, var 1, γ 1, β = (0, 0, 2)) → conv with w = (1, 0.5, 3): dead
    unit 2 feeds the constant β = 2 on, the largest contribution (6 per sample against x and 0.5x,
    x in [0.5, 1.5]), so by contributions alone it would go last (order 1, 0, 2). Dead units go
    first: then unit 1 (2·6·0.5x + 0.25x² per sample) before unit 0 (2·6·x + x²)."""
    net = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(3),
                        nn.Conv2d(3, 1, 1, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:2, 0, 0, 0] = 1.0
        net[2].running_var.fill_(1.0 - net[2].eps)
        net[2].bias.copy_(torch.tensor([0.0, 0.0, 2.0]))
        net[3].weight.copy_(torch.tensor([1.0, 0.5, 3.0]).reshape(1, 3, 1, 1))
    scores = create("thinet")(layer(net), batches_of(net))
    assert scores.tolist() == [2.0, 1.0, 0.0]


@pytest.mark.parametrize("groups, stride, dilation, padding", [(1, 1, 1, 1), (2, 2, 1, 2), (4, 1, 2, 0)])
def test_contributions_add_up_to_the_consumer_output(groups: int, stride: int, dilation: int, padding: int) -> None:
    """Σ_c x̂_c of a sample equals the consumer's output at that unit and location minus its bias."""
    torch.manual_seed(groups)
    conv = nn.Conv2d(8, 6 if groups != 4 else 8, 3, stride=stride, dilation=dilation, padding=padding, groups=groups)
    x = torch.randn(3, 8, 9, 9)
    out = conv(x).detach() - conv.bias.detach().reshape(1, -1, 1, 1)
    consumer = Consumer(conv, torch.eye(8, dtype=torch.float64))
    units = torch.tensor([0, conv.out_channels - 1, 2, 3])
    images = torch.tensor([0, 2, 1, 2])
    fractions = torch.tensor([0.0, 0.999, 0.5, 0.3], dtype=torch.float64)
    positions = out.shape[2] * out.shape[3]
    x_hat = contributions(consumer, x, units, fractions, images)
    for s in range(4):
        loc = int(fractions[s] * positions)
        expected = float(out[images[s], units[s], loc // out.shape[3], loc % out.shape[3]])
        assert float(x_hat[s].sum()) == pytest.approx(expected, abs=1e-5)
        # a channel outside the unit's group contributes nothing
        group = int(units[s]) // (conv.out_channels // groups)
        width = 8 // groups
        outside = [c for c in range(8) if c // width != group]
        assert (x_hat[s, outside] == 0).all()


def test_linear_consumer_maps_features_to_their_channel() -> None:
    """A Linear after flatten: channel c owns features c·s .. c·s + s − 1 (as ThiNet's fc6)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
    example = torch.randn(1, 3, 4, 4)
    [consumer] = find_consumers(net, [net[0]], example)[net[0]]
    assert consumer.module is net[4]
    assert consumer.to_root.tolist() == [[1, 0]] * 4 + [[0, 1]] * 4
    features = net[:4](example).detach()
    x_hat = contributions(consumer, features, torch.tensor([1]), torch.zeros(1, dtype=torch.float64), torch.tensor([0]))
    w = net[4].weight.detach().double()
    expected = [float((w[1, :4] * features[0, :4]).sum()), float((w[1, 4:] * features[0, 4:]).sum())]
    assert x_hat[0].tolist() == pytest.approx(expected, abs=1e-6)


class _Residual(nn.Module):
    """conv_a → ReLU → (· + conv_b(·)) → ReLU → conv_c: conv_a and conv_b are tied by the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv_a(x))
        return self.conv_c(torch.relu(y + self.conv_b(y)))


def test_a_residual_group_is_measured_at_every_reader_of_its_channels() -> None:
    """conv_a's channels are read by conv_b and (through the addition) by conv_c; conv_b's only by
    conv_c: pruning channel c of the group removes input c of both."""
    torch.manual_seed(5)
    net = _Residual().eval()
    found = find_consumers(net, [net.conv_a, net.conv_b], torch.randn(1, 3, 6, 6))
    assert {k.module for k in found[net.conv_a]} == {net.conv_b, net.conv_c}
    assert {k.module for k in found[net.conv_b]} == {net.conv_b, net.conv_c}


def test_deterministic_and_seeded() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1)).eval()
    batches = [ClassBatch(k, x, torch.relu(net[0](x)).detach())
               for k, x in enumerate(torch.randn(2, 4, 3, 7, 7).unbind(0))]
    first = create("thinet")(layer(net), batches)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(create("thinet")(layer(net), batches), first)
    assert sorted(first.tolist()) == list(range(12))
    others = [create("thinet", seed=s, samples=1)(layer(net), batches) for s in range(1, 6)]
    assert any(not torch.equal(o, first) for o in others)  # the samples decide


def test_classes_are_sampled_by_their_own_seed() -> None:
    """A class's samples depend on (seed, class index) only: scoring classes 0 and 1 in either
    order gives the same scores."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)).eval()
    batches = [ClassBatch(k, x, torch.relu(net[0](x)).detach())
               for k, x in enumerate(torch.randn(2, 3, 3, 6, 6).unbind(0))]
    assert torch.equal(create("thinet", samples=2)(layer(net), batches),
                       create("thinet", samples=2)(layer(net), batches[::-1]))
    # two classes of the same images get different samples (the class index seeds them)
    scorer = create("thinet", samples=2)
    scorer(layer(net), [batches[0], ClassBatch(1, batches[0].images, batches[0].activations)])
    sums, _ = scorer.state()
    assert not torch.equal(sums[0], sums[1])


class _SideOutput(nn.Module):
    """conv0's maps reach the output only through a mean: no conv or linear reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv0(x))
        return self.fc(x.mean(dim=(2, 3))) + y.mean(dim=(2, 3))


def test_a_layer_without_a_conv_consumer_is_refused_in_one_line() -> None:
    net = _SideOutput().eval()
    with pytest.raises(ValueError, match=r"^scorer 'thinet' cannot score layer 'conv0': .*--scorer") as err:
        create("thinet").check(net, classes=2, samples_per_class=3)
    assert "\n" not in str(err.value)
    x = torch.rand(2, 3, 5, 5)
    batch = ClassBatch(0, x, torch.relu(net.conv0(x)).detach())
    with pytest.raises(ValueError, match="cannot score layer 'conv0'"):
        create("thinet")(layer(net, "conv0"), [batch])


def test_check_accepts_plain_residual_and_conv_classifier_nets() -> None:
    import torchvision

    create("thinet").check(_Residual().eval(), classes=2, samples_per_class=3)  # conv_c is the output
    create("thinet").check(torchvision.models.resnet18(num_classes=5).eval(), classes=2, samples_per_class=3)


@pytest.mark.parametrize("options", [{"samples": 0}, {"seed": -1}])
def test_bad_options(options: dict) -> None:
    with pytest.raises(ValueError, match="thinet"):
        create("thinet", **options)


@pytest.mark.slow  # about 30 s on 2 cores: each member conv traces the model for its consumers
def test_thinet_drives_metapruner_on_resnet18() -> None:
    """prune.as_tp_importance("thinet") inside torch-pruning's MetaPruner on ResNet-18 (64², random
    weights): every group gets finite scores of its length, and the pruned model runs."""
    import torch_pruning as tp
    import torchvision

    import prune

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3).repeat_interleave(2)
    thinet = prune.as_tp_importance("thinet", images=x, labels=y)
    lengths: list[int] = []

    def recording(group):  # noqa: ANN001, ANN202
        scores = thinet(group)
        assert len(scores) == len(group[0].idxs) and torch.isfinite(scores).all()
        lengths.append(len(scores))
        return scores

    pruner = tp.pruner.MetaPruner(model, x[:1], importance=recording, pruning_ratio=0.25, ignored_layers=[model.fc])
    pruner.step()
    assert lengths and model.conv1.out_channels == 48
    with torch.no_grad():
        assert model(x).shape == (6, 3)


def test_large_maps_are_forwarded_a_few_images_at_a_time_with_the_same_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass up to the consumer holds at most PASS_BYTES in its largest tensor: 16 images of
    12 × 7 × 7 floats fit the default; with room for 3 images' conv outputs the batch is 3 (2 of a
    class's 20 images left for the last pass) and the greedy order is the same."""
    from scoring import hooks, thinet

    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1)).eval()
    batches = [ClassBatch(k, x, torch.relu(net[0](x)).detach())
               for k, x in enumerate(torch.randn(2, 20, 3, 7, 7).unbind(0))]
    consumers = find_consumers(net, [net[0]], batches[0].images[:1])[net[0]]
    assert thinet.forward_batch(net, consumers, batches[0].images[:1]) == thinet.FORWARD_BATCH
    whole = create("thinet")(layer(net), batches)
    monkeypatch.setattr(hooks, "PASS_BYTES", 3 * 12 * 7 * 7 * 4)
    assert thinet.forward_batch(net, consumers, batches[0].images[:1]) == 3
    assert torch.equal(create("thinet")(layer(net), batches), whole)
