"""DeepInversion as a continual learner — the student of ABD's DeepInversion baseline
(GT-RIPL/AlwaysBeDreaming-DFCIL `learners/datafree.py` `DeepInversionGenBN.update_model`).

Each step: real new-task data + an equal batch of synthetic replay. Loss = cross-entropy over seen
classes on real data + kd_weight × (distillation of the previous model's old-class logits on real
data + distillation on synthetic data towards the previous model's soft targets, zero-padded for the
new classes, over all seen classes — which keeps replayed images out of the new classes). Both
distillations are unnormalised as in the reference (`loss_fn_kd`, no T²; `t_squared=true` adds it).
ABD's table row pairs this student with the `generator` engine (`experiment=deepinversion_cifar100_*`);
`inversion=pixel` is NVlabs's pixel DeepInversion.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_inversion.methods.base import distillation
from cl_inversion.methods.inversion_student import InversionStudent


class DeepInversion(InversionStudent):
    def __init__(self, *args, temperature: float = 2.0, kd_weight: float = 1.0, t_squared: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.t_squared = t_squared

    def replay_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        replay_x, _ = self.sample_replay(len(x))
        logits = self(torch.cat([x, replay_x]))
        real, synthetic = logits[: len(x)], logits[len(x) :]
        with torch.no_grad():
            old = self.previous(torch.cat([x, replay_x]))
        t = self.temperature
        ce = self.seen_cross_entropy(real, y)
        kd_real = distillation(real[:, : self.n_old], old[: len(x)], t, self.t_squared)
        soft = F.pad(F.softmax(old[len(x) :] / t, dim=1), (0, self.n_seen - self.n_old))
        kd_synthetic = -(soft * F.log_softmax(synthetic[:, : self.n_seen] / t, dim=1)).sum(1).mean()
        if self.t_squared:
            kd_synthetic = kd_synthetic * t**2
        loss = ce + self.kd_weight * (kd_real + kd_synthetic)
        return {"loss": loss, "ce": ce, "kd_real": kd_real, "kd_synthetic": kd_synthetic}
