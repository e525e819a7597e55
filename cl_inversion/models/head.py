"""A linear head that grows by one slice of outputs per task, keeping old weights untouched.

With `logit_scale` set (backbones that expose `head_logit_scale`, i.e. CLIP) the head is a cosine
classifier as in CLIP: logits = scale · normalize(features) · normalize(W)ᵀ, no bias, so a slice initialised
with text embeddings starts as CLIP's zero-shot classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IncrementalLinear(nn.Module):
    """Outputs are the concatenation of one `nn.Linear` per task; growing adds a slice.

    Old slices keep their parameter objects, so growth never copies weights; a checkpoint records
    `sizes` so resume can rebuild the same slices before `load_state_dict`.
    """

    def __init__(self, in_features: int, logit_scale: float | None = None, bias: bool = True,
                 init: str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.logit_scale = logit_scale
        self.use_bias = bias and logit_scale is None
        self.init = init  # None: PyTorch's default; "kaiming_normal" (ABD); "normal_<std>" (cl-lite: 0.001)
        self.slices = nn.ModuleList()

    @property
    def sizes(self) -> list[int]:
        return [s.out_features for s in self.slices]

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    @property
    def cosine(self) -> bool:
        return self.logit_scale is not None

    def grow(self, n_new: int, weight: Tensor | None = None) -> nn.Linear:
        """Add `n_new` outputs; `weight` ([n_new, in_features], e.g. text embeddings) initialises them."""
        layer = nn.Linear(self.in_features, n_new, bias=self.use_bias)
        if self.init == "kaiming_normal":
            nn.init.kaiming_normal_(layer.weight)
        elif self.init is not None and self.init.startswith("normal_"):
            nn.init.normal_(layer.weight, std=float(self.init.removeprefix("normal_")))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if len(self.slices):
            layer.to(self.slices[0].weight.device)
        if weight is not None:
            with torch.no_grad():
                layer.weight.copy_(weight)
        self.slices.append(layer)
        return layer

    @property
    def weight(self) -> Tensor:
        return torch.cat([s.weight for s in self.slices])

    @property
    def bias(self) -> Tensor | None:
        return torch.cat([s.bias for s in self.slices]) if self.use_bias else None

    def forward(self, features: Tensor) -> Tensor:
        if not len(self.slices):
            raise RuntimeError("IncrementalLinear has no outputs yet: call grow() at the start of a task")
        if self.cosine:
            features = F.normalize(features, dim=-1)
            return self.logit_scale * torch.cat([F.linear(features, F.normalize(s.weight, dim=-1))
                                                 for s in self.slices], dim=1)
        return torch.cat([s(features) for s in self.slices], dim=1)


class IncrementalClassifier(nn.Module):
    """Backbone + growing head; label i is output i (the scenario remaps labels to class order)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalLinear(backbone.feature_dim, getattr(backbone, "head_logit_scale", None),
                                      bias=getattr(backbone, "head_bias", True),
                                      init=getattr(backbone, "head_init", None))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def grow(self, n_new: int, class_names: Sequence[str] | None = None,
             normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> nn.Linear:
        """Grow the head by `n_new` outputs at a task's start. Backbones that undo the dataset's normalisation
        (CLIP) get its (mean, std); backbones that embed text start the new slice from the embeddings of
        `class_names`."""
        if normalization is not None and hasattr(self.backbone, "set_input_normalization"):
            self.backbone.set_input_normalization(*normalization)
        weight = None
        if class_names is not None and hasattr(self.backbone, "text_embeddings"):
            weight = self.backbone.text_embeddings(list(class_names))
        return self.head.grow(n_new, weight)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return self.head(features), features
