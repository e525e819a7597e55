"""Feature extractors. Each exposes `feature_dim` and `blocks()`: the ordered stages that a per-layer
inversion engine walks (`features(x) == pool(blocks applied in order)`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Backbone(nn.Module):
    """Base: `stem`, a list of `stages`, global average pooling → `feature_dim` features."""

    feature_dim: int
    stem: nn.Module
    stages: nn.ModuleList

    def blocks(self) -> list[nn.Module]:
        return [self.stem, *self.stages]

    @property
    def has_batchnorm(self) -> bool:
        """Whether any BatchNorm layer exists: BN-statistics inversion terms need one (ViTs have none)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks():
            x = block(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(Backbone):
    """Three conv-BN-ReLU blocks for small inputs (digits 8×8): 32 → 64 (stride 2) → 128 features."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.stages = nn.ModuleList([conv_bn(width, 2 * width, stride=2), conv_bn(2 * width, 4 * width)])
        self.feature_dim = 4 * width


class BasicBlock(nn.Module):
    """ResNet basic block with a 1×1 projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(Backbone):
    """ResNet-(6n+2) for 32×32 inputs (He et al. 2016); depth 32 is the ABD / R-DFCIL backbone (64-d)."""

    def __init__(self, depth: int = 32, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"backbone.depth={depth} must be 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.stem = conv_bn(in_channels, width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.feature_dim = 4 * width


class ResNet18(Backbone):
    """ResNet-18 (torchvision's layers); `small_input` uses the 3×3 stride-1 stem without max-pool of
    CIFAR-style papers, otherwise the ImageNet stem."""

    def __init__(self, in_channels: int = 3, small_input: bool = True) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), net.bn1, net.relu)
        else:
            conv = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.stem = nn.Sequential(conv, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.feature_dim = 512
