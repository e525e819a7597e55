"""Feature extractors. Each exposes `feature_dim`, `blocks()`: the ordered blocks that a per-layer inversion
engine walks (`features(x) == pool(blocks applied in order)`; ResNets: the stem and every residual block, as
PMI's `get_all_blocks`), and `unfreeze_groups()`: the groups PMI's student unfreezes one by one, top first."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_inversion.utils.nn_utils import has_batchnorm


class Backbone(nn.Module):
    """Base: `stem`, a list of `stages`, global average pooling → `feature_dim` features."""

    feature_dim: int
    stem: nn.Module
    stages: nn.ModuleList

    def blocks(self) -> list[nn.Module]:
        return [self.stem, *self.stages]

    def unfreeze_groups(self) -> list[list[nn.Module]]:
        """The backbone in groups, last first, the stem with the first stage (PMI's `get_next_stage`: the
        `stage_*` attributes in reverse order, `stage_1` bringing `conv_1_3x3` and `bn_1`)."""
        groups = [[stage] for stage in reversed(self.stages)]
        groups[-1].append(self.stem)
        return groups

    @property
    def has_batchnorm(self) -> bool:
        """Whether any BatchNorm layer exists: BN-statistics inversion terms need one (ViTs have none)."""
        return has_batchnorm(self)

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


RESNET_VARIANTS = ("abd", "cl_lite", "projection")


class ZeroPadShortcut(nn.Module):
    """Parameter-free identity shortcut where the shape changes (He et al.'s option A): subsample by 2,
    then zero channels — split either side (ABD) or appended (cl-lite)."""

    def __init__(self, extra_channels: int, split: bool) -> None:
        super().__init__()
        self.extra, self.split = extra_channels, split

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        before = self.extra // 2 if self.split else 0
        return nn.functional.pad(x, (0, 0, 0, 0, before, self.extra - before))


class BasicBlock(nn.Module):
    """ResNet basic block. `variant`: "abd" — zero-padding identity shortcut, ReLU after the addition
    (GT-RIPL/AlwaysBeDreaming-DFCIL `models/resnet.py`, option A); "cl_lite" — zero-padding shortcut,
    no ReLU after the addition (gqk/cl-lite `backbone/resnet_cifar.py` `ResidualBlock`, last_relu=False);
    "projection" — 1×1-conv + BN shortcut, ReLU after the addition (this project's earlier form)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, variant: str = "abd") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu_after_add = variant != "cl_lite"
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if variant == "projection":
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            else:
                self.shortcut = ZeroPadShortcut(cout - cin, split=variant == "abd")

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(out) if self.relu_after_add else out


class CifarResNet(Backbone):
    """ResNet-(6n+2) for 32×32 inputs (He et al. 2016); depth 32 is the ABD / R-DFCIL backbone (64-d).

    `variant` picks the reference (see `BasicBlock`), its initialisation and its head:
      abd        — Kaiming-normal (fan-in) convolutions and head weights, head with bias (31 BN layers);
      cl_lite    — Kaiming-normal (fan-out) convolutions, BN weights 1 with the last BN of every block
                   zero-initialised, bias-free head initialised N(0, 0.001) (cl-lite `resnet_cifar.py`,
                   `nn/init.py` `weights_init_classifier`, R-DFCIL `module.py` `bias=False`; 31 BN layers);
      projection — 1×1-conv shortcuts, PyTorch's default init, head with bias (33 BN layers).
    """

    def __init__(self, depth: int = 32, in_channels: int = 3, width: int = 16, variant: str = "abd") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"backbone.depth={depth} must be 6n+2 (20, 32, 44, 56, 110)")
        if variant not in RESNET_VARIANTS:
            raise ValueError(f"backbone.variant={variant!r}: choose one of {', '.join(RESNET_VARIANTS)}")
        n = (depth - 2) // 6
        self.variant = variant
        self.stem = conv_bn(in_channels, width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1, variant)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.feature_dim = 4 * width
        self.head_bias = variant != "cl_lite"
        self.head_init = {"abd": "kaiming_normal", "cl_lite": "normal_0.001"}.get(variant)
        self._initialise()

    def blocks(self) -> list[nn.Module]:
        """The stem and every residual block (PMI's `get_all_blocks`: 16 blocks for ResNet-32)."""
        return [self.stem, *(block for stage in self.stages for block in stage)]

    def unfreeze_groups(self) -> list[list[nn.Module]]:
        """PMI's four stages of its ResNet-32 (the iCaRL port of cl-lite and PMI, `backbone/resnet_cifar.py`):
        `stage_4` is the last residual block, `stage_3` the other blocks at 4·width, then the 2·width blocks,
        then the width blocks with the stem."""
        last = self.stages[-1]
        return [[last[-1]], list(last[:-1]), [self.stages[1]], [self.stages[0], self.stem]]

    def _initialise(self) -> None:
        if self.variant == "projection":
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if self.variant == "abd":
                    nn.init.kaiming_normal_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and self.variant == "cl_lite":
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.variant == "cl_lite":
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


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

    def blocks(self) -> list[nn.Module]:
        """The stem and every residual block."""
        return [self.stem, *(block for stage in self.stages for block in stage)]
