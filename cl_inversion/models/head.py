"""A linear head that grows by one slice of outputs per task, keeping old weights untouched."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IncrementalLinear(nn.Module):
    """Outputs are the concatenation of one `nn.Linear` per task; growing adds a slice.

    Old slices keep their parameter objects, so growth never copies weights; a checkpoint records
    `sizes` so resume can rebuild the same slices before `load_state_dict`.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.slices = nn.ModuleList()

    @property
    def sizes(self) -> list[int]:
        return [s.out_features for s in self.slices]

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def grow(self, n_new: int) -> nn.Linear:
        layer = nn.Linear(self.in_features, n_new)
        if len(self.slices):
            layer.to(self.slices[0].weight.device)
        self.slices.append(layer)
        return layer

    @property
    def weight(self) -> Tensor:
        return torch.cat([s.weight for s in self.slices])

    @property
    def bias(self) -> Tensor:
        return torch.cat([s.bias for s in self.slices])

    def forward(self, features: Tensor) -> Tensor:
        if not len(self.slices):
            raise RuntimeError("IncrementalLinear has no outputs yet: call grow() at the start of a task")
        return torch.cat([s(features) for s in self.slices], dim=1)


class IncrementalClassifier(nn.Module):
    """Backbone + growing head; label i is output i (the scenario remaps labels to class order)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalLinear(backbone.feature_dim)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return self.head(features), features
