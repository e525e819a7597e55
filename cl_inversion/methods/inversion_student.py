"""`InversionStudent`: the base of every method that replays what a synthesis engine made of the previous
model (DeepInversion, ABD, R-DFCIL, PMI).

It owns the engine choice (`method.inversion`: a key of the `inversion` config — `pixel`, `generator`,
`rdfcil_generator`, `per_layer`; any engine pairs with any student), the replay the inversion callback hands
over at each task boundary (`receive_replay`), and the opening every such student shares: until there is a
replay (the first task), cross-entropy over the classes seen so far. A subclass states `replay_loss` only.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from cl_inversion.methods.base import ContinualModule


class InversionStudent(ContinualModule):
    keeps_previous_model = True  # the frozen previous model is the inversion teacher and the distillation target
    #: the engine a method uses unless `method.inversion` says otherwise
    default_inversion: str = "pixel"

    def __init__(self, *args: Any, inversion: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inversion = inversion or self.default_inversion
        self.replay: Any = None  # `.sample(n) -> (images, labels)`, from the inversion callback

    def receive_replay(self, replay: Any) -> None:
        """The inversion callback's hand-over: what `replay_loss` samples from during the next task."""
        self.replay = replay

    @property
    def has_replay(self) -> bool:
        return self.replay is not None and self.previous is not None

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        return self.replay_loss(x, y) if self.has_replay else self.first_task_loss(x, y)

    def first_task_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        """No replay yet: cross-entropy over the classes seen so far."""
        ce = self.seen_cross_entropy(self(x), y)
        return {"loss": ce, "ce": ce}

    def replay_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        """The method's loss on real new-task data `x, y`, sampling old classes from `self.replay`."""
        raise NotImplementedError
