"""Fine-tuning: cross-entropy on the current task only — the lower bound (it forgets)."""

from torch import Tensor

from cl_inversion.methods.base import ContinualModule


class Finetune(ContinualModule):
    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.seen_cross_entropy(self(x), y)
