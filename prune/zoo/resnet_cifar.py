"""The shipped residual testbed: the CIFAR-style ResNet-20 of He et al. (2016, section 4.2).

Three stages of three basic blocks (conv3x3-BN-ReLU, conv3x3-BN, identity added, ReLU) with
16, 32 and 64 channels; the first block of stages 2 and 3 halves the side (stride 2) and its
shortcut is a 1x1 conv + BatchNorm (He et al.'s option B; option A's zero-padded identity is
a lambda no pruning tool can trace). Global average pool, one linear layer.

On 28x28 Fashion-MNIST the three stages map 28x28, 14x14 and 7x7. The channels of a stage's
residual stream (its blocks' second convs, the shortcut, the stem) are one torch-pruning group.

>>> model = ResNetCifar(num_classes=10)
>>> model(torch.zeros(2, 3, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RESNET20_WIDTHS", "BasicBlock", "ResNetCifar"]

RESNET20_WIDTHS: tuple[int, ...] = (16, 32, 64)
"""Channels of the three stages of ResNet-20 (3 blocks each: 6·3 + 2 = 20 weight layers)."""


def _conv_bn(c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, [N, c_in, H, W] → [N, c_out, H / stride, W / stride]."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    """x → ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)); the shortcut is the identity, or a
    1x1 conv + BN where the side or the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _conv_bn(c_in, c_out, kernel=1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-6n+2 for small images: stem conv3x3-BN-ReLU, stages `widths` of `blocks` basic
    blocks each (every stage after the first halves the side), global average pool, `fc`.
    [N, 3, H, W] → logits [N, num_classes]."""

    def __init__(self, num_classes: int = 10, *, widths: Sequence[int] = RESNET20_WIDTHS, blocks: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}: pass e.g. num_classes=10")
        self.stem = nn.Sequential(*_conv_bn(3, widths[0]), nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(c_in if b == 0 else width, width, stride if b == 0 else 1)
                                          for b in range(blocks)]))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming convs (He et al.), unit BatchNorm, the last BN of each block at zero (each
        block starts as the identity: Goyal et al. 2017), torch's default linear layer."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] → logits [N, num_classes]."""
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
