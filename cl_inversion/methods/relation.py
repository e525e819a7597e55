"""The relation-guided student of R-DFCIL (Gao et al., ECCV 2022), which PMI keeps.

Reference: jianzhangcs/R-DFCIL `module.py` (terms, weights, class counts, first task) and
`mixin/finetuning.py` (balancing phase), gqk/cl-lite `nn/loss/distill_relation.py` (`RKDAngleLoss`).
While training task t (real new-task data + synthetic replay of old classes), with
α = log2(n_new/2 + 1) and β = √(n_old/n_new):
  local CE   — cross-entropy over the new classes' logits on real data,          × 0.5(1 + 1/α)/β
  HKD        — hard logit distillation: L1 between current and previous old-class
               logits on synthetic data,                                           × 0.15·α·β
  RKD        — L1 between the angle matrices of the current features and the previous
               features of real data, each through its own learnable projection
               (64 → 128, fresh each task),                                        × 0.5·α·β
The terms are added. Real and synthetic batches take separate forward passes, as in the reference
code, so BatchNorm never normalises real images with synthetic-batch statistics.

The last `finetune_fraction` of the epochs is the balancing phase, at a constant `finetune_lr`
(0.005 in R-DFCIL's code, whatever the main schedule): `finetune_ce_scale` (λ_ce = 0.5) × class-weighted
cross-entropy over the seen classes on real + synthetic data, plus HKD unless `finetune_hkd=false`
(R-DFCIL's code drops only RKD there). The class weights come from the labels counted over the task's
batches so far (real + synthetic), `w_c = Σn / n_c`, divided by their minimum, refreshed at each epoch's
end. On the first task (no replay) the balancing epochs train nothing, as in R-DFCIL (its training step
returns a zero loss there).
  finetune_loss  — "weighted": the counted class weights (R-DFCIL); "balanced_softmax": logits shifted by
                   the log of each class's share of the batch — real images of the new classes, synthetic
                   of the old, in the proportion `replay_ratio` sets — (Ren et al. 2020).
  finetune_scope — "head": only the classifier, on frozen eval-mode features (R-DFCIL); "all": the
                   whole network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.nn_utils import eval_mode

FINETUNE_LOSSES = ("weighted", "balanced_softmax")
FINETUNE_SCOPES = ("head", "all")


def angle_relations(embeddings: Tensor) -> Tensor:
    """Cosines of the angles formed by every triplet of embeddings (Park et al., RKD)."""
    diff = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """cl-lite's `RKDAngleLoss` after its projections: L1 between the two angle matrices."""
    return F.l1_loss(angle_relations(student), angle_relations(teacher))


class RelationProjection(nn.Module):
    """cl-lite's `RKDAngleLoss` embeddings: one learnable linear map for the student's features, another
    for the teacher's, to `2 × feature_dim` (R-DFCIL's `proj_dim`)."""

    def __init__(self, feature_dim: int, projection_dim: int) -> None:
        super().__init__()
        self.student = nn.Linear(feature_dim, projection_dim)
        self.teacher = nn.Linear(feature_dim, projection_dim)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return rkd_angle(self.student(student), self.teacher(teacher))


class RelationGuided(InversionStudent):

    def __init__(self, *args, ce_scale: float = 0.5, hkd_scale: float = 0.15,
                 rkd_scale: float = 0.5, projection_dim: int | None = None, finetune_fraction: float = 0.2,
                 finetune_lr: float = 0.005, finetune_loss: str = "weighted", finetune_scope: str = "head",
                 finetune_hkd: bool = True, finetune_ce_scale: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if finetune_loss not in FINETUNE_LOSSES:
            raise ConfigError(f"method.finetune_loss={finetune_loss!r}: choose one of {', '.join(FINETUNE_LOSSES)}")
        if finetune_scope not in FINETUNE_SCOPES:
            raise ConfigError(f"method.finetune_scope={finetune_scope!r}: choose one of {', '.join(FINETUNE_SCOPES)}")
        self.ce_scale, self.hkd_scale, self.rkd_scale = ce_scale, hkd_scale, rkd_scale
        self.finetune_fraction, self.finetune_lr = finetune_fraction, finetune_lr
        self.finetune_loss, self.finetune_scope, self.finetune_hkd = finetune_loss, finetune_scope, finetune_hkd
        self.finetune_ce_scale = finetune_ce_scale
        self.projection_dim = projection_dim or 2 * self.net.backbone.feature_dim
        self.projection = RelationProjection(self.net.backbone.feature_dim, self.projection_dim)
        self.class_counts = torch.zeros(0)
        self.class_weights = torch.ones(0)

    def on_task_start(self, datamodule: Any) -> None:
        """A fresh RKD projection and fresh class counts per task (R-DFCIL `update_old_model`, `setup`)."""
        device = self.net.head.slices[0].weight.device
        self.projection = RelationProjection(self.net.backbone.feature_dim, self.projection_dim).to(device)
        self.class_counts = torch.zeros(self.n_seen)
        self.class_weights = torch.ones(self.n_seen)

    def term_weights(self) -> dict[str, float]:
        n_new = self.n_seen - self.n_old
        alpha = math.log2(n_new / 2 + 1)
        beta = math.sqrt(self.n_old / n_new)
        return {"ce": self.ce_scale * (1 + 1 / alpha) / beta, "hkd": self.hkd_scale * alpha * beta,
                "rkd": self.rkd_scale * alpha * beta}

    def in_balancing_epochs(self) -> bool:
        """Whether the current epoch is one of the last `finetune_fraction` of the task's epochs."""
        if self._trainer is None or self.finetune_fraction <= 0:
            return False
        max_epochs = self.trainer.max_epochs or 1
        return self.current_epoch >= math.ceil((1 - self.finetune_fraction) * max_epochs)

    def in_balancing_phase(self) -> bool:
        return self.replay is not None and self.in_balancing_epochs()

    def count_labels(self, *labels: Tensor) -> None:
        counts = torch.bincount(torch.cat(labels).cpu(), minlength=self.n_seen)[: self.n_seen]
        if len(self.class_counts) != self.n_seen:
            self.class_counts = torch.zeros(self.n_seen)
        self.class_counts += counts

    def on_train_epoch_end(self) -> None:
        """R-DFCIL `training_epoch_end`: class weights Σn / n_c from the counts so far, divided by their min."""
        if self.replay is not None and len(self.class_counts):
            weights = self.class_counts.sum() / self.class_counts.clamp(min=1)
            self.class_weights = weights / weights.min()

    def first_task_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        if self.in_balancing_epochs():
            return None  # first task: R-DFCIL trains nothing in the balancing epochs
        return super().first_task_loss(x, y)

    def replay_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        replay_x, replay_y = self.sample_replay(len(x))
        self.count_labels(y, replay_y)
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
        rkd = self.projection(features, previous_features)
        loss = w["ce"] * local + w["hkd"] * hkd + w["rkd"] * rkd
        return {"loss": loss, "local_ce": local, "hkd": hkd, "rkd": rkd}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.in_balancing_phase():  # constant lr, whatever the main schedule does
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.finetune_lr

    def balancing_loss(self, x: Tensor, y: Tensor, replay_x: Tensor, replay_y: Tensor) -> dict[str, Tensor]:
        """Class-balanced CE over the seen classes on real + synthetic data (× λ_ce), plus HKD."""
        inputs, targets = torch.cat([x, replay_x]), torch.cat([y, replay_y])
        if self.finetune_scope == "head":
            with eval_mode(self.net.backbone), torch.no_grad():
                features = self.net.features(inputs)
            logits = self.net.head(features)
        else:
            logits = self.net(inputs)
        logits = logits[:, : self.n_seen]
        if self.finetune_loss == "balanced_softmax":  # prior: the batch's real (new) and synthetic (old) shares
            n_new = self.n_seen - self.n_old
            log_prior = torch.full((self.n_seen,), -math.log(n_new), device=logits.device)
            log_prior[: self.n_old] = -math.log(self.n_old) + math.log(len(replay_x) / len(x))  # + 0 at ratio 1
            ce = F.cross_entropy(logits + log_prior, targets)
        else:
            ce = F.cross_entropy(logits, targets, weight=self.class_weights.to(logits.device))
        ce = self.finetune_ce_scale * ce
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
        """The projection is rebuilt at the next task's start; loading keeps old checkpoints readable."""
        if set(state.get("projection", {})) == set(self.projection.state_dict()):
            self.projection.load_state_dict(state["projection"])
