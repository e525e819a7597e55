"""The relation-guided student of R-DFCIL (Gao et al., ECCV 2022), which PMI keeps.

While training task t (real new-task data + synthetic replay of old classes), with
α = log2(n_new/2 + 1) and β = √(n_old/n_new):
  local CE   — cross-entropy over the new classes' logits on real data,          × 0.5(1 + 1/α)/β
  HKD        — hard logit distillation: L1 between current and previous old-class
               logits on synthetic data,                                           × 0.15·α·β
  RKD        — angle-wise relation distillation between a learnable projection of
               current features and previous features of real data,               × 0.5·α·β
The terms are added (PMI's public code multiplies two of them; that is a bug). Real and synthetic
batches take separate forward passes, as in the reference code, so BatchNorm never normalises real
images with synthetic-batch statistics.

The last `finetune_fraction` of the epochs is the balancing phase, at a constant `finetune_lr`
(0.005 in R-DFCIL's code, whatever the main schedule): cross-entropy over the seen classes on real +
synthetic data, class-balanced, plus HKD unless `finetune_hkd=false` (R-DFCIL's code drops only RKD
there; it also scales that CE by λ_ce = 0.5, here it is unscaled).
  finetune_loss  — "weighted": per-sample weights that give every class the same total weight
                   (R-DFCIL); "balanced_softmax": logits shifted by the log of each class's share of the
                   batch — half real (new classes), half synthetic (old) — (Ren et al. 2020).
  finetune_scope — "head": only the classifier, on frozen eval-mode features (R-DFCIL); "all": the
                   whole network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.errors import ConfigError
from cl_inversion.methods.base import ContinualModule

FINETUNE_LOSSES = ("weighted", "balanced_softmax")
FINETUNE_SCOPES = ("head", "all")


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
                 finetune_lr: float = 0.005, finetune_loss: str = "weighted", finetune_scope: str = "head",
                 finetune_hkd: bool = True, **kwargs) -> None:
        super().__init__(*args, inversion=inversion, **kwargs)
        if finetune_loss not in FINETUNE_LOSSES:
            raise ConfigError(f"method.finetune_loss={finetune_loss!r}: choose one of {', '.join(FINETUNE_LOSSES)}")
        if finetune_scope not in FINETUNE_SCOPES:
            raise ConfigError(f"method.finetune_scope={finetune_scope!r}: choose one of {', '.join(FINETUNE_SCOPES)}")
        self.ce_scale, self.hkd_scale, self.rkd_scale = ce_scale, hkd_scale, rkd_scale
        self.finetune_fraction, self.finetune_lr = finetune_fraction, finetune_lr
        self.finetune_loss, self.finetune_scope, self.finetune_hkd = finetune_loss, finetune_scope, finetune_hkd
        self.projection = nn.Linear(self.net.backbone.feature_dim, projection_dim)

    def term_weights(self) -> dict[str, float]:
        n_new = self.n_seen - self.n_old
        alpha = math.log2(n_new / 2 + 1)
        beta = math.sqrt(self.n_old / n_new)
        return {"ce": self.ce_scale * (1 + 1 / alpha) / beta, "hkd": self.hkd_scale * alpha * beta,
                "rkd": self.rkd_scale * alpha * beta}

    def in_balancing_phase(self) -> bool:
        if self.replay is None or self._trainer is None:
            return False
        max_epochs = self.trainer.max_epochs or 1
        return self.current_epoch >= math.ceil((1 - self.finetune_fraction) * max_epochs)

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.replay is None or self.previous is None:
            ce = self.seen_cross_entropy(self(x), y)
            return {"loss": ce, "ce": ce}
        replay_x, replay_y = self.replay.sample(len(x))
        if self.in_balancing_phase():
            return self.balancing_loss(x, y, replay_x, replay_y)
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
        if self.in_balancing_phase():  # constant lr, whatever the main schedule does
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.finetune_lr

    def balancing_loss(self, x: Tensor, y: Tensor, replay_x: Tensor, replay_y: Tensor) -> dict[str, Tensor]:
        """Class-balanced CE over the seen classes on real + synthetic data, plus HKD."""
        inputs, targets = torch.cat([x, replay_x]), torch.cat([y, replay_y])
        if self.finetune_scope == "head":
            was_training = self.net.backbone.training
            self.net.backbone.eval()
            with torch.no_grad():
                features = self.net.features(inputs)
            self.net.backbone.train(was_training)
            logits = self.net.head(features)
        else:
            logits = self.net(inputs)
        logits = logits[:, : self.n_seen]
        if self.finetune_loss == "balanced_softmax":  # prior: half the batch real (new), half synthetic (old)
            n_new = self.n_seen - self.n_old
            log_prior = torch.full((self.n_seen,), -math.log(n_new), device=logits.device)
            log_prior[: self.n_old] = -math.log(self.n_old)
            ce = F.cross_entropy(logits + log_prior, targets)
        else:
            ce = (F.cross_entropy(logits, targets, reduction="none") * self.class_balance(targets)).mean()
        if not self.finetune_hkd:
            return {"loss": ce, "balanced_ce": ce}
        with torch.no_grad():
            previous_synthetic = self.previous(replay_x)
        hkd = (logits[len(x) :, : self.n_old] - previous_synthetic).abs().mean()
        loss = ce + self.term_weights()["hkd"] * hkd
        return {"loss": loss, "balanced_ce": ce, "hkd": hkd}

    def trainable_parameters(self):
        return [*super().trainable_parameters(), *self.projection.parameters()]

    def extra_state(self) -> dict:
        return {"projection": self.projection.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.projection.load_state_dict(state["projection"])
