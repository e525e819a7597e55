"""The relation-guided student of R-DFCIL (Gao et al., ECCV 2022), which PMI keeps.

While training task t (real new-task data + synthetic replay of old classes), with
α = log2(n_new/2 + 1) and β = √(n_old/n_new):
  local CE   — cross-entropy over the new classes' logits on real data,          × 0.5(1 + 1/α)/β
  HKD        — hard logit distillation: L1 between current and previous old-class
               logits on synthetic data,                                           × 0.15·α·β
  RKD        — angle-wise relation distillation between a learnable projection of
               current features and previous features of real data,               × 0.5·α·β
The terms are added (PMI's public code multiplies two of them; that is a bug). The last
`finetune_fraction` of the epochs trains only the head: class-balanced CE over the seen classes on
real + synthetic data with frozen (eval-mode, detached) features, at a constant `finetune_lr` (0.005 as
in R-DFCIL's code, whatever the main schedule). Real and synthetic batches take separate forward passes,
as in the reference code, so BatchNorm never normalises real images with synthetic-batch statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.methods.base import ContinualModule


def angle_relations(embeddings: Tensor) -> Tensor:
    """Cosines of the angles formed by every triplet of embeddings (Park et al., RKD)."""
    diff = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    return F.smooth_l1_loss(angle_relations(student), angle_relations(teacher))


class RelationGuided(ContinualModule):
    keeps_previous_model = True

    def __init__(self, *args, inversion: str = "generator", ce_scale: float = 0.5, hkd_scale: float = 0.15,
                 rkd_scale: float = 0.5, projection_dim: int = 128, finetune_fraction: float = 0.2,
                 finetune_lr: float = 0.005, **kwargs) -> None:
        super().__init__(*args, inversion=inversion, **kwargs)
        self.ce_scale, self.hkd_scale, self.rkd_scale = ce_scale, hkd_scale, rkd_scale
        self.finetune_fraction = finetune_fraction
        self.finetune_lr = finetune_lr
        self.projection = nn.Linear(self.net.backbone.feature_dim, projection_dim)

    def term_weights(self) -> dict[str, float]:
        n_new = self.n_seen - self.n_old
        alpha = math.log2(n_new / 2 + 1)
        beta = math.sqrt(self.n_old / n_new)
        return {"ce": self.ce_scale * (1 + 1 / alpha) / beta, "hkd": self.hkd_scale * alpha * beta,
                "rkd": self.rkd_scale * alpha * beta}

    def in_head_finetuning(self) -> bool:
        if self.replay is None or self._trainer is None:
            return False
        max_epochs = self.trainer.max_epochs or 1
        return self.current_epoch >= math.ceil((1 - self.finetune_fraction) * max_epochs)

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.replay is None or self.previous is None:
            ce = self.seen_cross_entropy(self(x), y)
            return {"loss": ce, "ce": ce}
        replay_x, replay_y = self.replay.sample(len(x))
        if self.in_head_finetuning():
            return self.head_finetuning(torch.cat([x, replay_x]), torch.cat([y, replay_y]))
        real_logits, features = self.net.forward_with_features(x)
        synthetic_logits = self.net(replay_x)  # separate pass: BN batch statistics never mix real and synthetic
        with torch.no_grad():
            previous_synthetic = self.previous(replay_x)
            previous_features = self.previous.features(x)
        w = self.term_weights()
        local = self.local_cross_entropy(real_logits, y)
        hkd = (synthetic_logits[:, : self.n_old] - previous_synthetic).abs().mean()
        rkd = rkd_angle(self.projection(features), previous_features)
        loss = w["ce"] * local + w["hkd"] * hkd + w["rkd"] * rkd
        return {"loss": loss, "local_ce": local, "hkd": hkd, "rkd": rkd}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.in_head_finetuning():  # constant lr, whatever the main schedule does
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.finetune_lr

    def head_finetuning(self, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        was_training = self.net.backbone.training
        self.net.backbone.eval()
        with torch.no_grad():
            features = self.net.features(inputs)
        self.net.backbone.train(was_training)
        logits = self.net.head(features)[:, : self.n_seen]
        head = (F.cross_entropy(logits, targets, reduction="none") * self.class_balance(targets)).mean()
        return {"loss": head, "head_ce": head}

    def trainable_parameters(self):
        return [*super().trainable_parameters(), *self.projection.parameters()]

    def extra_state(self) -> dict:
        return {"projection": self.projection.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.projection.load_state_dict(state["projection"])
