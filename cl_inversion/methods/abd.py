"""Always Be Dreaming (Smith et al., ICCV 2021) student.

Each step: 128 real new-task images + 128 synthetic images from the generator (labelled by the teacher).
  local  — cross-entropy over the new classes' logits only, on real data;
  head   — cross-entropy of the head on detached features of real + synthetic data, class-balanced weights,
           over the classes seen so far;
  kd     — importance-weighted feature distillation: ‖W_old·f_cur − W_old·f_prev‖² over old classes, ×0.1.

`head_classes`: "seen" (default: the fix of a known bug) or "all", the reference code's form
(GT-RIPL/AlwaysBeDreaming-DFCIL `learners/datafree.py`, `AlwaysBeDreaming.update_model`: `self.model.last`
is one `nn.Linear` over every class of the dataset, so the head CE — and the first task's CE — also push
down the rows of classes no task has shown yet, and a new task's classes start from those rows). With
"all" an extra block holds the unseen classes' rows; each task takes its new rows from it.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.models.head import IncrementalLinear
from cl_inversion.utils.errors import ConfigError

HEAD_CLASSES = ("seen", "all")


class ABD(InversionStudent):
    def __init__(self, *args, kd_weight: float = 0.1, head_classes: str = "seen", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if head_classes not in HEAD_CLASSES:
            raise ConfigError(f"method.head_classes={head_classes!r}: choose one of {', '.join(HEAD_CLASSES)}")
        if head_classes == "all" and self.net.head.cosine:
            raise ConfigError("method.head_classes='all' needs a linear head; this backbone's head is cosine (CLIP)")
        self.kd_weight = kd_weight
        self.head_classes = head_classes
        self.unseen: nn.Linear | None = None  # head_classes="all": the rows of the classes not shown yet

    def replay_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        replay_x, replay_y = self.sample_replay(len(x))
        inputs, targets = torch.cat([x, replay_x]), torch.cat([y, replay_y])
        weights = self.class_balance(targets)
        logits, features = self.net.forward_with_features(inputs)
        real = slice(0, len(x))
        local = (F.cross_entropy(logits[real, self.n_old : self.n_seen], y - self.n_old, reduction="none")
                 * weights[real]).mean()
        head_logits = self.head_logits(features.detach())
        head = (F.cross_entropy(head_logits, targets, reduction="none") * weights).mean()
        with torch.no_grad():
            previous_features = self.previous.features(inputs)
        old_head = self.previous.head
        kd = (old_head(features) - old_head(previous_features)).pow(2).sum(1).mean() / self.n_old
        loss = local + head + self.kd_weight * kd
        return {"loss": loss, "local_ce": local, "head_ce": head, "feature_kd": kd}

    def first_task_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        if self.head_classes == "seen":
            return super().first_task_loss(x, y)
        ce = F.cross_entropy(self.head_logits(self.net.features(x)), y)  # the reference: every output
        return {"loss": ce, "ce": ce}

    def head_logits(self, features: Tensor) -> Tensor:
        """The head's logits over the seen classes, or over every class with `head_classes="all"`."""
        logits = self.net.head(features)[:, : self.n_seen]
        return logits if self.unseen is None else torch.cat([logits, self.unseen(features)], dim=1)

    def on_task_start(self, datamodule: Any) -> None:
        """With `head_classes="all"`: at the first task, the unseen classes' rows (initialised as the head's);
        later, the new slice takes its rows from them."""
        if self.head_classes != "all":
            return
        head, n_new = self.net.head, self.task_sizes[-1]
        if self.task == 0:
            n_total = sum(len(task.classes) for task in datamodule.scenario.tasks)
            spare = IncrementalLinear(head.in_features, bias=head.use_bias, init=head.init)
            self.unseen = spare.grow(n_total - n_new).to(head.slices[0].weight.device) if n_total > n_new else None
        elif self.unseen is not None:
            new, rows = head.slices[-1], self.unseen
            with torch.no_grad():
                new.weight.copy_(rows.weight[:n_new])
                if new.bias is not None:
                    new.bias.copy_(rows.bias[:n_new])
            self.unseen = self.unseen_block(rows.weight[n_new:], None if rows.bias is None else rows.bias[n_new:])

    @staticmethod
    def unseen_block(weight: Tensor, bias: Tensor | None) -> nn.Linear | None:
        if not len(weight):
            return None
        block = nn.Linear(weight.shape[1], len(weight), bias=bias is not None).to(weight.device)
        with torch.no_grad():
            block.weight.copy_(weight)
            if bias is not None:
                block.bias.copy_(bias)
        return block

    def trainable_parameters(self):
        return [*super().trainable_parameters(), *(self.unseen.parameters() if self.unseen is not None else ())]

    def extra_state(self) -> dict:
        return {"unseen": self.unseen.state_dict()} if self.unseen is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if "unseen" in state:
            rows = state["unseen"]
            self.unseen = self.unseen_block(rows["weight"], rows.get("bias"))
