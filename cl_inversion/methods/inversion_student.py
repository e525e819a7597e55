"""`InversionStudent`: the base of every method that replays what a synthesis engine made of the previous
model (DeepInversion, ABD, R-DFCIL, PMI).

The engine is the config group `inversion/engine` (a method's YAML defaults choose it; any engine pairs with any
student: `inversion/engine=<name>`, one file each under conf/inversion/engine/). The student owns the replay the
inversion callback hands over at each task boundary (`receive_replay`), and the opening every such student
shares: until there is a replay (the first task), cross-entropy over the classes seen so far. A subclass states
`replay_loss` only, drawing old-class images with `sample_replay`.

`replay_augment` (off in every reference, hence off by default): a random crop (zero padding of 1/8 of the
image side) and a horizontal flip of each replayed synthetic image, as real CIFAR images get — a fixed buffer
of a few hundred images (DeepInversion, PMI) is otherwise seen unchanged dozens of times per task.

`replay_ratio` (1 in every reference: R-DFCIL `module.py` draws `inversion.sample(input.shape[0])`, ABD as
many synthetic images as real ones): synthetic images drawn per real image in each training step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_inversion.methods.base import ContinualModule
from cl_inversion.utils.errors import ConfigError


def crop_flip_batch(x: Tensor, padding: int) -> Tensor:
    """Per image: a random crop of the zero-padded image back to its size, then a flip with probability 1/2."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device)
    rows = top + torch.arange(h, device=x.device)
    cols = left + torch.arange(w, device=x.device)
    flip = torch.rand(n, 1, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


class InversionStudent(ContinualModule):
    keeps_previous_model = True  # the frozen previous model is the inversion teacher and the distillation target

    def __init__(self, *args: Any, replay_augment: bool = False,
                 replay_ratio: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not replay_ratio > 0:
            raise ConfigError(f"method.replay_ratio={replay_ratio!r}: must be > 0 (synthetic images per real image)")
        self.replay_augment = replay_augment
        self.replay_ratio = replay_ratio
        self.replay: Any = None  # `.sample(n) -> (images, labels)`, from the inversion callback

    def receive_replay(self, replay: Any) -> None:
        """The inversion callback's hand-over: what `replay_loss` samples from during the next task."""
        self.replay = replay

    def sample_replay(self, n: int) -> tuple[Tensor, Tensor]:
        """`replay_ratio` × n replayed old-class images and their labels (crop-and-flipped with `replay_augment`)."""
        images, labels = self.replay.sample(max(1, round(n * self.replay_ratio)))
        if self.replay_augment:
            images = crop_flip_batch(images, max(1, images.shape[-1] // 8))
        return images, labels

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
