"""Always Be Dreaming (Smith et al., ICCV 2021) student.

Each step: 128 real new-task images + 128 synthetic images from the generator (labelled by the teacher).
  local  — cross-entropy over the new classes' logits only, on real data;
  head   — cross-entropy of the head on detached features of real + synthetic data, over the classes seen
           so far (the reference code spans all outputs — a known bug), class-balanced weights;
  kd     — importance-weighted feature distillation: ‖W_old·f_cur − W_old·f_prev‖² over old classes, ×0.1.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_inversion.methods.inversion_student import InversionStudent


class ABD(InversionStudent):
    default_inversion = "generator"

    def __init__(self, *args, kd_weight: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kd_weight = kd_weight

    def replay_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        replay_x, replay_y = self.sample_replay(len(x))
        inputs, targets = torch.cat([x, replay_x]), torch.cat([y, replay_y])
        weights = self.class_balance(targets)
        logits, features = self.net.forward_with_features(inputs)
        real = slice(0, len(x))
        local = (F.cross_entropy(logits[real, self.n_old : self.n_seen], y - self.n_old, reduction="none")
                 * weights[real]).mean()
        head_logits = self.net.head(features.detach())[:, : self.n_seen]
        head = (F.cross_entropy(head_logits, targets, reduction="none") * weights).mean()
        with torch.no_grad():
            previous_features = self.previous.features(inputs)
        old_head = self.previous.head
        kd = (old_head(features) - old_head(previous_features)).pow(2).sum(1).mean() / self.n_old
        loss = local + head + self.kd_weight * kd
        return {"loss": loss, "local_ce": local, "head_ce": head, "feature_kd": kd}
