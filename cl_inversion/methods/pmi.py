"""PMI's student (Tong et al., NeurIPS 2025) as its authors' code trains it.

Reference: RuilinTong/PMI-CFS-DFCL at 2913603, `ResNet-32/continual_runner/task_contrastive_cl_runner.py`
(`train_single_task`, `train_head`, `train_with_backbone`, `build_optimizer`, `get_next_stage`); the modules
that commit holds as `.pyc` are read from the REMIX fork (d1f7f86): `continual_runner/finetuning.py`
(`finetuning`), `continual_runner/losses.py` (`LocalCELoss`, `RelationKDLoss`).

Task 0: cross-entropy over the task's classes, the run's optimizer and scheduler.
Task t > 0 runs in stages, each a fresh SGD (the run's momentum and weight decay) — the scripts' `epochs`
20, 20, 0, 0, 120 at `lrs` 0.1, 0.05, 0, 0, 0.01, then 40 epochs at 0.005:
  head      backbone frozen (eval mode), the newest head slice trained, constant lr:
                λce'·CE_local + (0.01·λhkd')·HKD ⊗ λft'·FT
  k groups  the top k groups of the backbone unfrozen (train mode) + the newest head slice + the RKD
            projection, lr ×0.1 at 50 % and 75 % of the stage:
                λce'·CE_local + λhkd'·HKD + λrkd'·RKD ⊗ λft'·FT
  finetune  backbone frozen (eval mode), every head slice, constant lr:  λce·CE_w + λhkd'·HKD
with α = log2(n_new/2 + 1), β = √(n_old/n_new): λce' = λce(1+1/α)/β, λft' = λft(1+1/α)/β, λhkd' = λhkd·α·β,
λrkd' = λrkd·α·β (λce 0.75, λhkd 0.15, λrkd 0.5, λft 1.5 in the 10-task script).
  CE_local  cross-entropy over the new classes' outputs, real images;
  HKD       L1 between the old outputs on replayed images and the previous model's logits;
  RKD       cl-lite's angle loss: current vs previous features of the real images, each through its own
            linear map to 2×feature_dim (fresh each task);
  FT        cross-entropy over every output on the detached features of the real and replayed images;
  CE_w      cross-entropy over every output on real + replayed images, class weights Σn/n_c (÷ min) from the
            labels counted since the task began (counts start at 1), refreshed each finetune epoch.
`combine`: "product" is the code (⊗ = ×: `rkd_factor * l_rkd * ft_factor * l_ft`), "sum" is R-DFCIL's form
(⊗ = +). Stage epochs are the scripts' at 200 epochs a task; another `trainer.max_epochs` scales them
(`scaled_epochs`); a stage's lr milestones are the code's `int(0.5·e)`, `int(0.75·e)`, except that a milestone
at 0 — a stage of one epoch, which only a scaled budget makes — is dropped (the code would decay the lr ×0.01
before the stage's first step). The backbone's `unfreeze_groups()` are the stages (ResNet-32: PMI's four);
`stage_epochs` lists the head stage, one entry per group, the whole network last — a backbone with fewer groups
skips the entries before the last, which must then be 0 (the scripts' are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.methods.relation import RelationProjection
from cl_inversion.utils.errors import ConfigError

COMBINE = ("product", "sum")


def scaled_epochs(epochs: list[int], total: int) -> list[int]:
    """`epochs` (a budget summing to any n) rescaled to sum to `total` by largest remainders; a stage that
    had epochs keeps at least one while the total allows."""
    budget = sum(epochs)
    if budget == total or budget == 0:
        return list(epochs)
    exact = [e * total / budget for e in epochs]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    for i, e in enumerate(epochs):
        if e and not out[i] and max(out) > 1:
            out[out.index(max(out))] -= 1
            out[i] = 1
    return out


def pmi_loss_factors(n_old: int, n_new: int, ce: float, hkd: float, rkd: float, ft: float) -> dict[str, float]:
    """The runner's `train_single_task` factors (no `max_ratio`)."""
    alpha = math.log(n_new / 2 + 1, 2)
    beta = math.sqrt(n_old / n_new)
    return {"ce": ce * (1 + 1 / alpha) / beta, "ft": ft * (1 + 1 / alpha) / beta,
            "hkd": hkd * alpha * beta, "rkd": rkd * alpha * beta}


@dataclass
class Stage:
    """Epochs of one part of a task's training: `unfrozen` backbone groups (-1: the finetune stage)."""

    unfrozen: int
    epochs: int
    lr: float
    milestones: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return {0: "head", -1: "finetune"}.get(self.unfrozen, f"groups_{self.unfrozen}")


class PMI(InversionStudent):
    def __init__(self, *args: Any, ce_scale: float = 0.75, hkd_scale: float = 0.15, rkd_scale: float = 0.5,
                 ft_scale: float = 1.5, stage_epochs: list[int] = (20, 20, 0, 0, 120),
                 stage_lrs: list[float] = (0.1, 0.05, 0.0, 0.0, 0.01), finetune_epochs: int = 40,
                 finetune_lr: float = 0.005, head_hkd_scale: float = 0.01, combine: str = "product",
                 projection_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if combine not in COMBINE:
            raise ConfigError(f"method.combine={combine!r}: choose one of {', '.join(COMBINE)}")
        if len(stage_epochs) != len(stage_lrs):
            raise ConfigError(f"method.stage_epochs ({len(stage_epochs)} entries) and method.stage_lrs "
                              f"({len(stage_lrs)}) must be as long: the head stage, then one per backbone group")
        n_groups = len(self.groups())
        dropped = list(stage_epochs[n_groups:-1])
        if len(stage_epochs) < 2 or n_groups > len(stage_epochs) - 1 or any(dropped):
            raise ConfigError(f"method.stage_epochs={list(stage_epochs)}: the first entry is the head stage, the last "
                              f"the whole network, one per group between; this backbone unfreezes in {n_groups} "
                              f"groups, so entries {n_groups}..{len(stage_epochs) - 2} (if any) must be 0")
        self.scales = {"ce": ce_scale, "hkd": hkd_scale, "rkd": rkd_scale, "ft": ft_scale}
        self.stage_epochs, self.stage_lrs = list(stage_epochs), list(stage_lrs)
        self.finetune_epochs, self.finetune_lr = finetune_epochs, finetune_lr
        self.head_hkd_scale, self.combine = head_hkd_scale, combine
        self.projection_dim = projection_dim or 2 * self.net.backbone.feature_dim
        self.projection = RelationProjection(self.net.backbone.feature_dim, self.projection_dim)
        self.class_counts = torch.ones(0)
        self.stage: Stage | None = None

    # --- the task's plan -----------------------------------------------------------------------------
    def groups(self) -> list[list[nn.Module]]:
        backbone = self.net.backbone
        return backbone.unfreeze_groups() if hasattr(backbone, "unfreeze_groups") else [[backbone]]

    def plan(self) -> list[Stage]:
        """The stages of a task after the first, scaled to `trainer.max_epochs`; 0-epoch stages dropped."""
        total = self.trainer.max_epochs if self._trainer is not None else sum(self.stage_epochs) + self.finetune_epochs
        n_groups = len(self.groups())
        kept = [*range(n_groups), len(self.stage_epochs) - 1]  # entry i: i groups unfrozen; the last: all
        epochs = scaled_epochs([*(self.stage_epochs[i] for i in kept), self.finetune_epochs], total)
        stages = [Stage(k, e, self.stage_lrs[i], [] if k == 0 else [m for m in (int(e * 0.5), int(e * 0.75)) if m])
                  for k, (i, e) in enumerate(zip(kept, epochs))]
        stages.append(Stage(-1, epochs[-1], self.finetune_lr))
        return [s for s in stages if s.epochs > 0]

    def stage_at(self, epoch: int) -> Stage:
        end = 0
        for stage in self.plan():
            end += stage.epochs
            if epoch < end:
                return stage
        return stage

    def on_task_start(self, datamodule: Any) -> None:
        """A fresh projection and fresh class counts (`prepare_before_training`, `cls_count = ones`)."""
        device = self.net.head.slices[0].weight.device
        self.projection = RelationProjection(self.net.backbone.feature_dim, self.projection_dim).to(device)
        self.class_counts = torch.ones(self.n_seen)
        self.stage = None

    def enter(self, stage: Stage) -> None:
        """Freeze the backbone in eval mode and unfreeze the stage's groups in train mode (`build_optimizer`)."""
        self.stage = stage
        backbone = self.net.backbone
        backbone.eval()
        backbone.requires_grad_(False)
        for group in self.groups()[: max(stage.unfrozen, 0)]:
            for module in group:
                module.train()
                module.requires_grad_(True)

    def on_train_epoch_start(self) -> None:
        if not self.has_replay:
            return
        stage = self.stage_at(self.current_epoch)
        if stage != self.stage:
            first = self.stage is None
            self.enter(stage)
            if not first:  # a fresh optimizer for the new stage
                self.trainer.strategy.setup_optimizers(self.trainer)

    def on_train_end(self) -> None:
        """`enable_backbone_training`: every parameter trainable again, for the next task and the teacher."""
        self.net.backbone.requires_grad_(True)
        self.net.backbone.train()
        self.stage = None

    def configure_optimizers(self) -> Any:
        if not self.has_replay:
            return super().configure_optimizers()
        stage = self.stage or (self.stage_at(self.current_epoch) if self._trainer is not None else self.plan()[0])
        if stage.unfrozen == -1:
            params = list(self.net.head.parameters())
        else:
            params = [*self.net.head.slices[-1].parameters()]
            if stage.unfrozen > 0:
                params += [*self.projection.parameters()]
                params += [p for group in self.groups()[: stage.unfrozen] for m in group for p in m.parameters()]
        optimizer = self.optimizer_factory(params, lr=stage.lr)
        if not stage.milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=stage.milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # --- losses --------------------------------------------------------------------------------------
    def factors(self) -> dict[str, float]:
        return pmi_loss_factors(self.n_old, self.n_seen - self.n_old, **{k: self.scales[k] for k in
                                                                          ("ce", "hkd", "rkd", "ft")})

    def count(self, labels: Tensor) -> None:
        self.class_counts += torch.bincount(labels.cpu(), minlength=self.n_seen)[: self.n_seen]

    def first_task_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """`LocalCELoss` from class 0: cross-entropy over the task's outputs."""
        ce = self.local_cross_entropy(self(x), y)
        return {"loss": ce, "ce": ce}

    def join(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b if self.combine == "product" else a + b

    def replay_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        stage = self.stage or self.stage_at(self.current_epoch)
        replay_x, replay_y = self.sample_replay(len(x))
        self.count(torch.cat([y, replay_y]))
        with torch.no_grad():
            teacher_logits = self.previous(replay_x)
        if stage.unfrozen == -1:
            return self.finetune_loss(x, y, replay_x, replay_y, teacher_logits)
        w = self.factors()
        logits, features = self.net.forward_with_features(x)
        replay_features = self.net.features(replay_x)
        replay_logits = self.net.head(replay_features)
        local = self.local_cross_entropy(logits, y)
        hkd = F.l1_loss(replay_logits[:, : self.n_old], teacher_logits)
        ft = F.cross_entropy(self.net.head(torch.cat([features.detach(), replay_features.detach()])),
                             torch.cat([y, replay_y]))
        if stage.unfrozen == 0:
            loss = w["ce"] * local + self.join(self.head_hkd_scale * w["hkd"] * hkd, w["ft"] * ft)
            return {"loss": loss, "local_ce": local, "hkd": hkd, "ft": ft}
        with torch.no_grad():
            previous_features = self.previous.features(x)
        rkd = self.projection(features, previous_features)
        loss = w["ce"] * local + w["hkd"] * hkd + self.join(w["rkd"] * rkd, w["ft"] * ft)
        return {"loss": loss, "local_ce": local, "hkd": hkd, "rkd": rkd, "ft": ft}

    def finetune_loss(self, x: Tensor, y: Tensor, replay_x: Tensor, replay_y: Tensor,
                      teacher_logits: Tensor) -> dict[str, Tensor]:
        """`finetuning.finetuning`: class-weighted CE over all outputs (λce unscaled) + λhkd'·HKD."""
        logits = torch.cat([self.net(x), self.net(replay_x)])
        ce = F.cross_entropy(logits, torch.cat([y, replay_y]), weight=self.epoch_weights.to(logits.device))
        hkd = F.l1_loss(logits[len(x):, : self.n_old], teacher_logits)
        loss = self.scales["ce"] * ce + self.factors()["hkd"] * hkd
        return {"loss": loss, "weighted_ce": ce, "hkd": hkd}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and self.has_replay:  # the finetune epoch's class weights, from the counts so far
            weights = self.class_counts.sum() / self.class_counts.clamp(min=1)
            self.epoch_weights = weights / weights.min()

    def extra_state(self) -> dict:
        return {"projection": self.projection.state_dict(), "class_counts": self.class_counts}

    def load_extra_state(self, state: dict) -> None:
        if set(state.get("projection", {})) == set(self.projection.state_dict()):
            self.projection.load_state_dict(state["projection"])
        if "class_counts" in state:
            self.class_counts = state["class_counts"]
