"""Joint training on all data seen so far — the upper bound (no data-free constraint)."""

from torch import Tensor

from cl_inversion.methods.base import ContinualModule


class Joint(ContinualModule):
    uses_all_data = True

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.seen_cross_entropy(self(x), y)
