"""Surgery, channel counts and the paper's Table 12 (params and FLOPs of pruned VGG16)."""

import pytest
import torch
import torchvision
from torch import nn

import scoring
from prune.pipeline.counting import count_cost
from prune.pipeline.selection import lowest, select_and_prune
from prune.pipeline.surgery import Surgeon, channels_to_remove, classifier_convs
from prune.zoo.models import create_model

TABLE12 = {0.0: (138.0e6, 30.96e9), 0.4: (87.8e6, 11.15e9), 0.5: (75.9e6, 7.87e9), 0.6: (64.2e6, 5.02e9)}
"""The paper's Table 12: VGG16 (224², 1000 classes) pruned at each ratio → (params, FLOPs)."""


@pytest.mark.parametrize("ratio", sorted(TABLE12))
def test_table12_params_and_flops_within_half_percent(ratio):
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 224, 224))
    select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=ratio, rounding="floor-keep", quiet=True)
    cost = count_cost(model, input_size=224)
    params, flops = TABLE12[ratio]
    assert abs(cost.params / params - 1) < 0.005, (cost, params)
    assert abs(cost.flops / flops - 1) < 0.005, (cost, flops)


class Upsampling(nn.Module):
    """Conv2d 3→8 (16²), a transposed conv 8→4 doubling the side (32²), a Conv1d 4→6 over the rows, a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.rows = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.up(torch.relu(self.conv(x)))  # [N, 4, 32, 32]
        return self.fc(self.rows(maps.mean(2)).mean(2))  # rows: [N, 4, 32] → [N, 6, 32]


def test_transposed_and_one_dimensional_convs_are_counted_as_convs():
    cost = count_cost(Upsampling(), input_size=16)
    by_hand = {"conv": 3 * 8 * 9 * 16 * 16, "up": 8 * 4 * 4 * 16 * 16, "rows": 4 * 6 * 3 * 32, "fc": 6 * 5}
    assert cost.by_module == by_hand and cost.macs == sum(by_hand.values())


def test_unpruned_vgg16_flops_are_twice_the_conv_and_linear_macs():
    model = torchvision.models.vgg16(weights=None)
    cost = count_cost(model, input_size=224)
    # Hand count: Σ over convs of Cin·Cout·9·s² plus the three linear layers.
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    cin, s, macs = 3, 224, 0
    for v in cfg:
        if v == "M":
            s //= 2
            continue
        macs += cin * v * 9 * s * s
        cin = v
    macs += 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    assert cost.macs == macs
    assert cost.flops == 2 * macs
    assert cost.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "channels,ratio,rule,expected",
    [(64, 0.5, "round", 32), (128, 0.4, "round", 51), (128, 0.4, "floor-keep", 52), (512, 0.6, "floor-keep", 308),
     (10, 0.0, "round", 0), (1, 0.9, "round", 0), (4, 0.99, "round", 3)],
)
def test_channels_to_remove(channels, ratio, rule, expected):
    assert channels_to_remove(channels, ratio, rule=rule) == expected


def test_lowest_breaks_ties_by_index():
    assert lowest(torch.tensor([0.5, 0.1, 0.1, 0.9, 0.1]), 2) == (1, 2)


def _prune_l1(model: nn.Module, size: int, ratio: float = 0.5):
    surgeon = Surgeon(model.eval(), torch.zeros(1, 3, size, size))
    decisions = select_and_prune(surgeon, scoring.create("l1"), None, ratio=ratio, quiet=True)
    return surgeon, decisions


def test_vgg_groups_are_in_depth_order_and_classifier_keeps_its_outputs():
    model = torchvision.models.vgg11(weights=None, num_classes=7)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    surgeon, decisions = _prune_l1(model, 32)
    assert [d.name for d in decisions] == convs
    for d in decisions:
        conv = model.get_submodule(d.name)
        assert conv.out_channels == d.channels_after == d.channels_before // 2
    assert model.classifier[-1].out_features == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_removed_channels_are_the_lowest_l1_filters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    with torch.no_grad():
        for i, scale in enumerate([5, 0.1, 3, 0.2, 4, 0.3]):
            model[0].weight[i] = scale
    kept_weights = model[0].weight[[0, 2, 4]].clone()
    _, decisions = _prune_l1(model, 8)
    assert decisions[0].removed == (1, 3, 5)
    assert torch.equal(model[0].weight, kept_weights)
    assert model[2].in_channels == 3


@pytest.mark.parametrize("name", ["resnet34", "timm:convnext_atto", "timm:mobilenetv3_small_050"])
def test_residual_and_timm_models_prune_at_half_and_run(name):
    model = create_model(name, num_classes=10, pretrained=False)
    before = count_cost(model, input_size=64)
    surgeon, decisions = _prune_l1(model, 64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    for d in decisions:
        for member in d.members:
            assert model.get_submodule(member).out_channels == d.channels_after
    after = count_cost(model, input_size=64)
    assert after.params < 0.5 * before.params


def test_resnet_residual_group_holds_every_conv_feeding_the_addition():
    model = create_model("resnet34", num_classes=10, pretrained=False)
    surgeon = Surgeon(model.eval(), torch.zeros(1, 3, 64, 64))
    stage2 = next(g for g in surgeon.groups if "layer2.0.downsample.0" in g.names)
    assert set(stage2.names) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.2.conv2", "layer2.3.conv2"}


def test_a_classifier_conv_is_never_pruned_but_its_inputs_follow():
    """SqueezeNet's head is a 1x1 conv whose channels are the classes: not a group; the convs
    feeding it are, and pruning them keeps the model's 10 outputs."""
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    x = torch.zeros(1, 3, 64, 64)
    assert classifier_convs(model, x) == [model.classifier[1]]
    surgeon = Surgeon(model, x)
    names = [n for g in surgeon.groups for n in g.names]
    assert "classifier.1" not in names and "features.12.expand3x3" in names
    for group in surgeon.groups:
        surgeon.prune(group, list(range(group.num_channels // 2)))
    assert model(x).shape == (1, 10) and model.classifier[1].in_channels == 256
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    assert classifier_convs(vgg, torch.zeros(1, 3, 32, 32)) == []  # a Linear head: nothing to exclude


def test_verifying_the_groups_leaves_the_model_as_it_was() -> None:
    """Surgeon's trial copy shares the model's Parameters (no copy of the weights): after the
    trial surgery and forward, a model in train mode keeps the same Parameter objects, shapes,
    values and BatchNorm statistics, every module its training mode, and its groups are all found
    working."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).train()
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgeon = Surgeon(model, torch.randn(2, 3, 8, 8))
    assert [g.name for g in surgeon.groups] == ["0", "3"]
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
