"""L2 regularisation towards earlier weights: CE over the seen classes + reg_coef · Σ_k Σ_θ Ω_k (θ − θ*_k)².

Reference: GT-RIPL/Continual-Learning-Benchmark, `agents/regularization.py` (class `L2`, with `EWC` and
`EWC_online` built on it). As there:

* every trainable parameter is regularised (`self.params` = all of the model's, head included);
* after each task the weights θ*_k and an importance Ω_k (all ones for L2) are stored; the penalty sums
  Σ Ω_k (θ − θ*_k)² over the stored slots, times `reg_coef`;
* `online` (the reference's `online_reg`; True for L2, False for EWC, True for `EWC_online`) keeps a single
  slot: the latest weights, and the importance of the new task added to the stored one (for L2 the new
  all-ones importance replaces the old one: `calculate_importance` returns ones);
* the cross-entropy spans all classes seen so far (`default.py` `criterion` with `valid_out_dim`).

Difference: our head grows one slice per task, so a slice created after slot k has no stored weights
in it and is not penalised by slot k; the reference's single full-size head penalises unseen rows
towards their initial values (which receive no other gradient there, so it changes nothing).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from cl_inversion.methods.base import ContinualModule


class L2(ContinualModule):
    """`slots[k] = {"anchor": {name: θ*_k}, "importance": {name: Ω_k}}`, names as in `net.named_parameters()`."""

    #: the reference's `online_reg` default for this class (L2: True, EWC: False)
    default_online = True

    def __init__(self, *args, reg_coef: float = 1.0, online: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reg_coef = reg_coef
        self.online = self.default_online if online is None else online
        self.slots: list[dict[str, dict[str, Tensor]]] = []

    def regularised_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """Σ_k Σ_θ Ω_k (θ − θ*_k)² (reference `L2.criterion`), without `reg_coef`."""
        params = self.regularised_parameters()
        total = torch.zeros((), device=self.device)
        for slot in self.slots:
            for name, anchor in slot["anchor"].items():
                param = params[name]
                total = total + (slot["importance"][name].to(param.device)
                                 * (param - anchor.to(param.device)) ** 2).sum()
        return total

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        ce = self.seen_cross_entropy(self(x), y)
        if not self.slots:
            return {"loss": ce, "ce": ce}
        reg = self.penalty()
        return {"loss": ce + self.reg_coef * reg, "ce": ce, "reg": reg}

    def task_importance(self, datamodule: L.LightningDataModule) -> dict[str, Tensor]:
        """Ω of the task just learned: ones for L2 (reference `L2.calculate_importance`)."""
        return {n: torch.ones_like(p).detach() for n, p in self.regularised_parameters().items()}

    #: online: add the new importance to the stored one (EWC_online) instead of replacing it (L2)
    accumulates_online = False

    def on_task_end(self, datamodule: L.LightningDataModule) -> None:
        """Reference `L2.learn_batch`: back up the weights, compute the importance, store a slot."""
        anchor = {n: p.detach().clone() for n, p in self.regularised_parameters().items()}
        importance = self.task_importance(datamodule)
        if self.online and self.slots:
            if self.accumulates_online:
                old = self.slots[0]["importance"]
                importance = {n: v + old[n] if n in old else v for n, v in importance.items()}
            self.slots = [{"anchor": anchor, "importance": importance}]
        else:
            self.slots.append({"anchor": anchor, "importance": importance})

    def extra_state(self) -> dict:
        """Flat dicts of tensors, keyed `"<slot>/<parameter name>"`."""
        return {kind: {f"{k}/{n}": t for k, slot in enumerate(self.slots) for n, t in slot[kind].items()}
                for kind in ("anchor", "importance")}

    def load_extra_state(self, state: dict) -> None:
        slots: dict[int, dict[str, dict[str, Tensor]]] = {}
        for kind in ("anchor", "importance"):
            for key, t in state[kind].items():
                k, name = key.split("/", 1)
                slots.setdefault(int(k), {"anchor": {}, "importance": {}})[kind][name] = t
        self.slots = [slots[k] for k in sorted(slots)]
