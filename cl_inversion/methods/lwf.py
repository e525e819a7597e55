"""Learning without Forgetting (Li & Hoiem 2016), class-incremental form as in ABD's baseline
(GT-RIPL/AlwaysBeDreaming-DFCIL `learners/kd.py` `LWF.update_model` with `default.py` `loss_fn_kd`):
cross-entropy over seen classes + mu × distillation of the previous model's old-class logits at T=2,
unnormalised (no T²; `t_squared=true` adds it)."""

from torch import Tensor

from cl_inversion.methods.base import ContinualModule, distillation


class LwF(ContinualModule):
    keeps_previous_model = True

    def __init__(self, *args, temperature: float = 2.0, weight: float = 1.0, t_squared: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.weight = weight
        self.t_squared = t_squared

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = self(x)
        ce = self.seen_cross_entropy(logits, y)
        if self.previous is None:
            return {"loss": ce, "ce": ce}
        kd = distillation(logits[:, : self.n_old], self.previous(x), self.temperature, self.t_squared)
        return {"loss": ce + self.weight * kd, "ce": ce, "kd": kd}
