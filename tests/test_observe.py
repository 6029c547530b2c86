"""Units are read after the activation the model applies, found from the traced graph.

Every expected value is computed by hand from the modules' weights and running statistics
with torch.nn.functional, independently of the graph walk and the hooks.
"""

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from prune.errors import UsageError
from prune.pipeline.observe import collect_units, following_norm, observe, run_until_captured
from prune.pipeline.sites import unit_site
from prune.pipeline.surgery import Surgeon
from prune.zoo.embedded_model import EmbeddedVGG


def _close(got: torch.Tensor, expected: torch.Tensor, *, scale: torch.Tensor | None = None) -> None:
    """Equal up to float32 rounding, relative to the size of the values (or of `scale`)."""
    size = (expected if scale is None else scale).abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, size), rtol=1e-4)


def _randomized(model: nn.Module, seed: int = 0, *, gain: float = 1.0) -> nn.Module:
    """`model` in eval mode with random norm statistics and affine parameters (so no norm is
    an identity), weights seeded."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5 * gain, 1.5 * gain)
            nn.init.uniform_(m.bias, -0.5, 0.5)
        elif isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


def _bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm by hand: (x − μ)/√(σ² + eps)·γ + β per channel."""
    shape = (1, -1, 1, 1)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(shape)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _units(model: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    return collect_units(model, model.get_submodule(name), images, name=name)


# ---------------------------------------------------------------- embedded VGG: relu(bn(conv))


@torch.no_grad()
def test_embedded_units_are_relu_of_bn_of_conv():
    model = _randomized(EmbeddedVGG())
    images = torch.randn(2, 3, 32, 32)
    x = images
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            name = f"features.{i}"
            expected = torch.relu(_bn(layers[i + 1], _conv(layer, x)))
            site = unit_site(model, name)
            assert (site.activation, site.residual, site.norm) == ("ReLU", False, f"features.{i + 1}")
            assert following_norm(model, layer) is layers[i + 1]
            _close(_units(model, name, images), expected)
        x = layer(x)


# ---------------------------------------------------------------- torchvision resnet18


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _randomized(torchvision.models.resnet18(num_classes=10))


@torch.no_grad()
def _resnet_block_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Input of layer1.0 by hand: maxpool(relu(bn1(conv1(x))))."""
    x = torch.relu(_bn(model.bn1, _conv(model.conv1, images)))
    return F.max_pool2d(x, 3, 2, 1)


@torch.no_grad()
def test_resnet_internal_conv_is_read_after_relu_of_bn1(resnet18):
    images = torch.randn(2, 3, 64, 64)
    block = resnet18.layer1[0]
    expected = torch.relu(_bn(block.bn1, _conv(block.conv1, _resnet_block_input(resnet18, images))))
    site = unit_site(resnet18, "layer1.0.conv1")
    assert (site.module, site.call, site.activation, site.residual) == ("layer1.0.relu", 0, "ReLU", False)
    _close(_units(resnet18, "layer1.0.conv1", images), expected)


@torch.no_grad()
def test_resnet_residual_conv_is_read_at_the_block_output_after_its_relu(resnet18):
    """Documented choice: the last conv of a residual branch is read after the activation of
    the sum (the block output, paper A.5) — block 1.0's ReLU, second call."""
    images = torch.randn(2, 3, 64, 64)
    block = resnet18.layer1[0]
    x0 = _resnet_block_input(resnet18, images)
    h = torch.relu(_bn(block.bn1, _conv(block.conv1, x0)))
    expected = torch.relu(_bn(block.bn2, _conv(block.conv2, h)) + x0)
    site = unit_site(resnet18, "layer1.0.conv2")
    assert (site.module, site.call, site.activation, site.residual) == ("layer1.0.relu", 1, "ReLU", True)
    units = _units(resnet18, "layer1.0.conv2", images)
    _close(units, expected)
    without_shortcut = torch.relu(_bn(block.bn2, _conv(block.conv2, h)))
    assert not torch.allclose(units, without_shortcut, atol=1e-3)


@torch.no_grad()
def test_resnet_downsample_conv_shares_the_block_output_with_conv2(resnet18):
    images = torch.randn(1, 3, 64, 64)
    a, b = _units(resnet18, "layer2.0.conv2", images), _units(resnet18, "layer2.0.downsample.0", images)
    assert unit_site(resnet18, "layer2.0.downsample.0").residual
    torch.testing.assert_close(a, b)
    assert a.shape[1] == resnet18.layer2[0].conv2.out_channels


@torch.no_grad()
def test_resnet_units_follow_torch_pruning_surgery():
    model = _randomized(torchvision.models.resnet18(num_classes=10))
    images = torch.randn(2, 3, 64, 64)
    before = unit_site(model, "layer1.0.conv1")
    _units(model, "layer1.0.conv1", images)
    surgeon = Surgeon(model, torch.randn(1, 3, 64, 64))
    group = next(g for g in surgeon.groups if g.name == "layer1.0.conv1")
    surgeon.prune(group, [0, 5, 7])
    block = model.layer1[0]
    assert block.conv1.out_channels == 61
    assert unit_site(model, "layer1.0.conv1") is before  # cached: names and module types are unchanged
    expected = torch.relu(_bn(block.bn1, _conv(block.conv1, _resnet_block_input(model, images))))
    _close(_units(model, "layer1.0.conv1", images), expected)


# ---------------------------------------------------------------- torchvision mobilenet_v2


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return _randomized(torchvision.models.mobilenet_v2(num_classes=10), gain=8.0)


@torch.no_grad()
def test_mobilenet_expanding_conv_is_read_after_relu6(mobilenet):
    images = torch.randn(2, 3, 64, 64)
    expand = mobilenet.features[2].conv[0]  # Conv 1x1, BN, ReLU6
    pre = _bn(expand[1], _conv(expand[0], mobilenet.features[:2](images)))
    expected = torch.clamp(pre, 0.0, 6.0)
    site = unit_site(mobilenet, "features.2.conv.0.0")
    assert (site.activation, site.residual) == ("ReLU6", False)
    units = _units(mobilenet, "features.2.conv.0.0", images)
    _close(units, expected, scale=pre)
    assert (units == 6.0).any(), "large BN gains must make ReLU6 saturate"


@torch.no_grad()
def test_mobilenet_projection_conv_has_no_activation(mobilenet):
    """Documented choice: no activation follows the projection — read after its BN, or at the
    block output (BN + shortcut) in a residual block."""
    images = torch.randn(2, 3, 64, 64)
    x2 = mobilenet.features[:2](images)
    block = mobilenet.features[2]  # stride 2: no shortcut
    expected = _bn(block.conv[3], _conv(block.conv[2], block.conv[:2](x2)))
    site = unit_site(mobilenet, "features.2.conv.2")
    assert (site.activation, site.residual) == (None, False)
    units = _units(mobilenet, "features.2.conv.2", images)
    _close(units, expected)
    assert (units < 0).any()

    x3 = mobilenet.features[:3](images)
    block = mobilenet.features[3]  # stride 1, 24 → 24: residual
    expected = x3 + _bn(block.conv[3], _conv(block.conv[2], block.conv[:2](x3)))
    site = unit_site(mobilenet, "features.3.conv.2")
    assert (site.activation, site.residual) == (None, True)
    _close(_units(mobilenet, "features.3.conv.2", images), expected)


# ---------------------------------------------------------------- timm ConvNeXt


def _layer_norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channel dim of [N, C, H, W], by hand."""
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def convnext() -> nn.Module:
    torch.manual_seed(0)
    model = _randomized(timm.create_model("convnext_atto", pretrained=False, num_classes=10))
    with torch.no_grad():
        for block in model.stages[0].blocks:
            block.gamma.uniform_(0.5, 1.5)  # layer scale (1e-6 at init) made visible
    return model


@torch.no_grad()
def test_convnext_units(convnext):
    images = torch.randn(2, 3, 64, 64)
    stem = convnext.stem
    x0 = _layer_norm_2d(stem[1], _conv(stem[0], images))
    block = convnext.stages[0].blocks[0]
    normed = _layer_norm_2d(block.norm, _conv(block.conv_dw, x0))
    hidden = F.gelu(_conv(block.mlp.fc1, normed))
    out = x0 + _conv(block.mlp.fc2, hidden) * block.gamma.view(1, -1, 1, 1)
    prefix = "stages.0.blocks.0"

    fc1 = unit_site(convnext, f"{prefix}.mlp.fc1")  # pointwise conv → GELU
    assert (fc1.activation, fc1.residual) == ("GELU", False)
    _close(_units(convnext, f"{prefix}.mlp.fc1", images), hidden)

    dw = unit_site(convnext, f"{prefix}.conv_dw")  # depthwise → LayerNorm → pointwise: after the norm
    assert (dw.activation, dw.residual) == (None, False)
    _close(_units(convnext, f"{prefix}.conv_dw", images), normed)

    fc2 = unit_site(convnext, f"{prefix}.mlp.fc2")  # layer scale, + shortcut, no activation
    assert (fc2.activation, fc2.residual) == (None, True)
    _close(_units(convnext, f"{prefix}.mlp.fc2", images), out)

    _close(_units(convnext, "stem.0", images), x0)


@torch.no_grad()
def test_convnext_last_branch_of_a_stage_stops_before_the_next_stage_norm(convnext):
    images = torch.randn(1, 3, 64, 64)
    last = "stages.0.blocks.1.mlp.fc2"
    site = unit_site(convnext, last)
    assert (site.activation, site.residual) == (None, True)
    _close(_units(convnext, last, images), convnext.stages[0](convnext.stem(images)))


@torch.no_grad()
def test_channels_last_layer_norm_unit_is_returned_channels_first():
    torch.manual_seed(0)
    model = _randomized(timm.create_model("convnext_atto", pretrained=False, num_classes=10, conv_mlp=False))
    images = torch.randn(1, 3, 64, 64)
    block = model.stages[0].blocks[0]
    x0 = model.stages[0].downsample(model.stem(images))
    norm = block.norm
    normed = F.layer_norm(_conv(block.conv_dw, x0).permute(0, 2, 3, 1), (40,), norm.weight, norm.bias, norm.eps)
    site = unit_site(model, "stages.0.blocks.0.conv_dw")
    assert (site.activation, site.channel_dim) == (None, 3)
    _close(_units(model, "stages.0.blocks.0.conv_dw", images), normed.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- functional and other activations


class SiluNet(nn.Module):
    """conv → BN → F.silu; conv → BN → torch.relu(· + shortcut); F.relu(inplace) on a plain conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = F.relu(self.conv3(h), inplace=True)
        return self.head(h.mean((2, 3)))


class HardswishNet(nn.Module):
    """conv → Hardswish (no norm), conv → BN → Hardswish (one shared module), head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.bn2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 3), nn.BatchNorm2d(5)
        self.act = nn.Hardswish()
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def test_functional_silu_relu_and_inplace_relu():
    model = _randomized(SiluNet())
    images = torch.randn(2, 3, 32, 32)
    h1 = F.silu(_bn(model.bn1, _conv(model.conv1, images)))
    h2 = torch.relu(_bn(model.bn2, _conv(model.conv2, h1)) + h1)
    h3 = torch.relu(_conv(model.conv3, h2))
    expected = {"conv1": (h1, "silu", False), "conv2": (h2, "relu", True), "conv3": (h3, "relu", False)}
    for name, (value, activation, residual) in expected.items():
        site = unit_site(model, name)
        assert (site.module, site.activation, site.residual) == (None, activation, residual), name
        _close(_units(model, name, images), value)


@torch.no_grad()
def test_hardswish_module_called_twice():
    model = _randomized(HardswishNet())
    images = torch.randn(2, 3, 32, 32)
    h1 = F.hardswish(_conv(model.conv1, images))
    h2 = F.hardswish(_bn(model.bn2, _conv(model.conv2, h1)))
    for name, value, call in (("conv1", h1, 0), ("conv2", h2, 1)):
        site = unit_site(model, name)
        assert (site.module, site.call, site.activation) == ("act", call, "Hardswish")
        _close(_units(model, name, images), value)


@pytest.mark.parametrize("model_cls", [SiluNet, HardswishNet])
@torch.no_grad()
def test_forward_stops_once_units_are_captured(model_cls):
    model = _randomized(model_cls())
    calls = []
    handle = model.head.register_forward_hook(lambda *_: calls.append(1))
    try:
        with observe(model, model.conv1) as captured:
            run_until_captured(model, torch.randn(1, 3, 32, 32))
        assert len(captured) == 1 and not calls
    finally:
        handle.remove()


# ---------------------------------------------------------------- fallback and bad input


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.act(self.bn(self.conv(x))).mean((2, 3))


@torch.no_grad()
def test_untraceable_model_falls_back_to_registration_order_with_one_warning():
    model = _randomized(Untraceable())
    images = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="cannot trace Untraceable"):
        site = unit_site(model, "conv")
    assert (site.traced, site.module, site.activation) == (False, "act", "GELU")
    x = torch.where(images.sum() > 0, -images, images)
    expected = F.gelu(_bn(model.bn, _conv(model.conv, x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        units = _units(_randomized(Untraceable()), "conv", images)  # a second instance: no new warning
    _close(_units(model, "conv", images), expected)
    assert units.shape == expected.shape


def test_unknown_conv_name_is_a_usage_error():
    with pytest.raises(UsageError, match="no conv layer"):
        unit_site(SiluNet(), "head")
