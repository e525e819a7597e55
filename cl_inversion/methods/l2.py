"""L2 regularisation towards the previous task's weights: CE + reg_coef · Σ(θ − θ_prev)²."""

import lightning as L
import torch
from torch import Tensor

from cl_inversion.methods.base import ContinualModule


class L2(ContinualModule):
    def __init__(self, *args, reg_coef: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reg_coef = reg_coef
        self.anchor: dict[str, Tensor] = {}
        self.importance: dict[str, Tensor] = {}

    def penalty(self) -> Tensor:
        total = torch.zeros((), device=self.device)
        for name, param in self.net.backbone.named_parameters():
            if name in self.anchor:
                total = total + (self.importance[name] * (param - self.anchor[name]) ** 2).sum()
        return total

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        ce = self.seen_cross_entropy(self(x), y)
        if not self.anchor:
            return {"loss": ce, "ce": ce}
        reg = self.penalty()
        return {"loss": ce + self.reg_coef * reg, "ce": ce, "reg": reg}

    def task_importance(self, datamodule: L.LightningDataModule) -> dict[str, Tensor]:
        """Per-parameter weight of the penalty for the task just learned: uniform for L2."""
        return {n: torch.ones_like(p) for n, p in self.net.backbone.named_parameters()}

    def on_task_end(self, datamodule: L.LightningDataModule) -> None:
        new = self.task_importance(datamodule)
        if self.accumulates and self.importance:
            new = {n: self.importance[n] + v for n, v in new.items()}
        self.importance = new
        self.anchor = {n: p.detach().clone() for n, p in self.net.backbone.named_parameters()}

    accumulates = False  # L2 weights every parameter 1; EWC sums the Fisher of all tasks

    def extra_state(self) -> dict:
        return {"anchor": self.anchor, "importance": self.importance}

    def load_extra_state(self, state: dict) -> None:
        self.anchor, self.importance = state["anchor"], state["importance"]
