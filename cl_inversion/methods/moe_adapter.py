"""PMI's CLIP learner: a frozen open_clip model whose mixture-of-experts adapters, routers and router noise
are trained (MoE-Adapters4CL), replaying per-block inversions of the previous vision tower.

Reference: pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at d1f7f86, `CLIP/models/moe_adapter.py`
(`Learner.__init__`, `_train`, `_init_train`), model name `moe_adapter_inv`, with `configs/moe_adapter/cf100.yaml`.

Task 0:  CE(s · f̂(x) · t̂_newᵀ, y − n_old)   (s = exp(logit_scale), f̂ / t̂ the normalised image / text features of
         the current task's prompts, through the student's experts).
Task t:  λce'·CE + λhkd'·HKD + λtkd'·TKD + λft·(FT_old + FT_new), with α = log2(n_new/2 + 1), β = √(n_old/n_new),
         λce' = λce(1 + 1/α)/β, λhkd' = λhkd·α·β, λtkd' = λtkd·α·β (`change_factor`), λft as given:
  HKD     L1(s · g(u) · t̂_oldᵀ, s · g_prev(u) · t̂_oldᵀ): u replayed block-`start_block` inputs (as many as real
          images, drawn with replacement), g / g_prev the student / previous vision tower from that block,
          L2-normalised; the *student's* old-class text features on both sides (the code's `old_ft`);
  TKD     L1(t̂_old, t̂_old of the previous model);
  FT_old  CE(s · g(u).detach() · t̂_allᵀ, y_u); FT_new  CE(s · f̂(x).detach() · t̂_allᵀ, y).
The code runs a fresh forward for each term (each with its own router noise and dropout); here one image forward
per input and one text forward per step feed every term: the same values where noise and dropout are off.
Optimiser: AdamW over the experts only (`lr` 1e-3, `weight_decay` 0), the code's per-step warm-up cosine
(`cosine_lr`, 30 warm-up steps over the task's steps; JiazuoYu/MoE-Adapters4CL `cil/continual_clip/utils.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.methods.pmi import pmi_loss_factors
from cl_inversion.models.moe_clip import Adapter, MoEClipBackbone, PromptHead, is_expert_parameter
from cl_inversion.utils.errors import ConfigError


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """The lr factor of `cosine_lr` at `step` (0-based): (step + 1)/warmup during the warm-up, then
    ½(1 + cos(π (step − warmup)/(steps − warmup)))."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


class MoEAdapter(InversionStudent):

    def __init__(self, *args: Any, template: str = "a bad photo of a {}.", ce_scale: float = 1.0,
                 hkd_scale: float = 0.1, tkd_scale: float = 0.2, ft_scale: float = 0.001, change_factor: bool = True,
                 start_block: int = 1, warmup_steps: int | None = 30, lr: float = 1e-3, weight_decay: float = 0.0,
                 open_set: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.net.backbone, MoEClipBackbone):
            raise ConfigError("method=moe_adapter needs backbone=moe_clip_* (open_clip with experts), got "
                              f"{type(self.net.backbone).__name__}")
        self.net.head = PromptHead(*self.net.backbone.text_tower(), template=template)
        self.scales = {"ce": ce_scale, "hkd": hkd_scale, "tkd": tkd_scale, "ft": ft_scale}
        self.change_factor, self.start_block, self.warmup_steps = change_factor, start_block, warmup_steps
        self.lr, self.weight_decay = lr, weight_decay
        self.open_set = dict(open_set) if open_set else None
        self.open_batch_size = 64

    def on_task_start(self, datamodule: Any) -> None:
        self.net.head.name_classes(datamodule.task_class_names)
        self.open_batch_size = getattr(datamodule, "batch_size", self.open_batch_size)

    def extra_state(self) -> dict[str, Any]:
        """The prompts of the classes seen (the head's text, which the weights do not hold)."""
        return {"prompts": list(self.net.head.prompts)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.net.head.prompts = list(state["prompts"])

    @property
    def open_set_task(self) -> bool:
        """With `open_set`, the last task's classes are learnt without their data (`train_open_set`)."""
        return self.open_set is not None and self.is_last_task and self.n_old > 0

    def on_train_start(self) -> None:
        if self.open_set_task:  # its data are not used: the inversion callback's open-set step trains it
            self.trainer.should_stop = True

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for name, p in self.net.named_parameters() if is_expert_parameter(name)]

    def configure_optimizers(self) -> Any:
        """The code's AdamW over the experts (its config's `optimizer: sgd` is never read) and `cosine_lr`; the run's
        `optimizer` is not used, its `scheduler` only with `warmup_steps: null`."""
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps is None:
            return optimizer if self.scheduler_factory is None else {
                "optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
        steps = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def factors(self, scales: dict[str, float] | None = None) -> dict[str, float]:
        """The code's loss factors: `change_factor` from the second task on, else λce = 1 and the raw λs."""
        s = scales or self.scales
        if self.change_factor and self.n_old > 0:
            f = pmi_loss_factors(self.n_old, self.n_seen - self.n_old, s["ce"], s["hkd"], s["tkd"], s["ft"])
            return {"ce": f["ce"], "hkd": f["hkd"], "tkd": f["rkd"], "ft": s["ft"]}
        return {"ce": 1.0, "hkd": s["hkd"], "tkd": s["tkd"], "ft": s["ft"]}

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        if self.open_set_task:
            return None
        head: PromptHead = self.net.head
        features = self.net.backbone(x)
        text = head.text_features()
        ce = F.cross_entropy(head.logits(features, text[self.n_old :]), y - self.n_old)
        if not self.has_replay:
            return {"loss": ce, "ce": ce}
        f = self.factors()
        terms = {"ce": ce, **self.replay_terms(x, y, features, text)}
        total = f["ce"] * ce + f["hkd"] * terms["hkd"] + f["tkd"] * terms["tkd"]
        total = total + f["ft"] * (terms["ft_old"] + terms["ft_new"])
        return {"loss": total, **terms}

    def replay_terms(self, x: Tensor, y: Tensor, features: Tensor, text: Tensor) -> dict[str, Tensor]:
        """HKD, TKD and the two FT terms on a replayed batch as large as the real one."""
        head: PromptHead = self.net.head
        scale = head.logit_scale
        replay_x, replay_y = self.sample_replay(len(y))
        replay_x, replay_y = replay_x.to(x.device), replay_y.to(x.device)
        student = self.net.backbone.forward_from(self.start_block, replay_x, normalize=True)
        with torch.no_grad():
            teacher = self.previous.backbone.forward_from(self.start_block, replay_x, normalize=True)
            teacher_text = self.previous.head.text_features(0, self.n_old)
        old = text[: self.n_old]
        hkd = F.l1_loss(scale * student @ old.T, scale * teacher @ old.T)
        tkd = F.l1_loss(old, teacher_text)
        ft_old = F.cross_entropy(scale * student.detach() @ text.T, replay_y)
        ft_new = F.cross_entropy(scale * F.normalize(features.detach().float(), dim=-1) @ text.T, y)
        return {"hkd": hkd, "tkd": tkd, "ft_old": ft_old, "ft_new": ft_new}

    def open_set_loss(self, u: Tensor, y: Tensor) -> dict[str, Tensor]:
        """`openset_training`'s step on block inputs `u` of classes without data: CE over the new prompts of
        g(u) (the student from `start_block`, normalised) and the replay terms, weighted by the `open_set` λs."""
        head: PromptHead = self.net.head
        features = self.net.backbone.forward_from(self.start_block, u, normalize=True)
        text = head.text_features()
        ce = F.cross_entropy(head.logits(features, text[self.n_old :]), y - self.n_old)
        o = self.open_set
        f = self.factors({"ce": o["ce_scale"], "hkd": o["hkd_scale"], "tkd": o["tkd_scale"], "ft": o["ft_scale"]})
        terms = {"ce": ce, **self.replay_terms(u, y, features, text)}
        total = f["ce"] * ce + f["hkd"] * terms["hkd"] + f["tkd"] * terms["tkd"]
        return {"loss": total + f["ft"] * (terms["ft_old"] + terms["ft_new"]), **terms}

    def open_set_mode(self) -> None:
        """The modes `openset_training` trains in: its per-epoch `eval_task` leaves the network in eval mode and
        `set_is_train(True)` turns the router noise back on, so the experts' dropout is off, the noise on."""
        self.net.train()
        for module in self.net.modules():
            if isinstance(module, Adapter):
                module.eval()

    def train_open_set(self, pool: Tensor, labels: Tensor) -> None:
        """`openset_training`: AdamW over the experts (`lr`), `cosine_lr` (`warmup_steps`, over 3 epochs' steps:
        the code's constant), `epochs` passes over the pool repeated `repeat` times (`RandomDataset`), shuffled
        by a `DataLoader` as the code's, batches of the dataset's `batch_size`, last batch kept; the network in
        `open_set_mode`."""
        o, device = self.open_set, next(self.net.parameters()).device
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=o["lr"], weight_decay=self.weight_decay)
        loader = DataLoader(RepeatedPool(pool, labels, o["repeat"]), batch_size=self.open_batch_size, shuffle=True)
        self.open_set_mode()
        for epoch in range(o["epochs"]):
            for i, (u, y) in enumerate(loader):
                factor = warmup_cosine(len(loader) * epoch + i, o["warmup_steps"], 3 * len(loader))
                for group in optimizer.param_groups:
                    group["lr"] = o["lr"] * factor
                terms = self.open_set_loss(u.to(device), y.to(device))
                optimizer.zero_grad()
                terms["loss"].backward()
                optimizer.step()
        self.net.eval()


class RepeatedPool(Dataset):
    """`RandomDataset`: the pool `repeat` times over, entry i being pool[i mod its size]."""

    def __init__(self, pool: Tensor, labels: Tensor, repeat: int) -> None:
        self.pool, self.labels, self.repeat = pool, labels.long(), repeat

    def __len__(self) -> int:
        return len(self.labels) * self.repeat

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.pool[index % len(self.labels)], self.labels[index % len(self.labels)]
