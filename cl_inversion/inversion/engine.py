"""The contract between the inversion callback and a synthesis engine, and a base with its defaults.

At every task boundary but the last, `InversionCallback` calls, in this order:

    engine.setup(image_shape, pixel_range)        # the data's shape and the box of normalised pixels
    engine.observe(teacher, real_batches, previous_images, previous_labels)   # the task's real data (no-op by default)
    images, labels = engine.synthesize(teacher, classes, n)   # n images of `classes`, on the teacher's device
    replay = engine.replay(teacher, images, labels)           # what the student samples from next task
    method.receive_replay(replay)                             # the one hand-over to the student

and reads `engine.name` and `engine.stats` (cost and loss curve of the last synthesis). `state_dict()` /
`load_state_dict()` carry what must survive a resume (a generator, feature Gaussians); `load_state_dict`
may run before `setup`. A replay is anything with `sample(n) -> (images, labels)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from cl_inversion.inversion.common import SynthesisStats
from cl_inversion.inversion.compiling import decide, network_flops
from cl_inversion.inversion.replay import BufferReplay


class Replay(Protocol):
    def sample(self, n: int) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class SynthesisEngine(Protocol):
    name: str
    stats: SynthesisStats

    def setup(self, image_shape: Sequence[int], pixel_range: tuple[Tensor, Tensor]) -> None: ...

    def observe(self, teacher: nn.Module, real_batches: Iterable[tuple[Tensor, Tensor]],
                replay_images: Tensor | None, replay_labels: Tensor | None) -> None: ...

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]: ...

    def replay(self, teacher: nn.Module, images: Tensor, labels: Tensor) -> Replay: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CONTRACT = ("name", "stats", "setup", "observe", "synthesize", "replay", "state_dict", "load_state_dict")


def missing_members(engine: Any) -> list[str]:
    """The parts of the contract `engine` lacks (empty: it is a synthesis engine)."""
    return [member for member in CONTRACT if not hasattr(engine, member)]


class EngineBase:
    """Defaults for an engine: `setup` keeps the shape and pixel box, `observe` does nothing, the replay is
    the synthesised buffer, and there is no state to checkpoint. `step_hook(images, step)`, when set, is
    called at the start (step -1) and after every optimisation step (benchmarks watch quality with it)."""

    name = "engine"

    def __init__(self) -> None:
        self.image_shape: tuple[int, ...] = ()
        self.pixel_range: tuple[Tensor, Tensor] | None = None
        self.stats = SynthesisStats()
        self.step_hook = None

    def setup(self, image_shape: Sequence[int], pixel_range: tuple[Tensor, Tensor]) -> None:
        self.image_shape = tuple(image_shape)
        self.pixel_range = pixel_range

    def observe(self, teacher: nn.Module, real_batches: Iterable[tuple[Tensor, Tensor]],
                replay_images: Tensor | None, replay_labels: Tensor | None) -> None:
        """Engines that model the real data (PMI's feature Gaussians) look at the task's data here."""

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def replay(self, teacher: nn.Module, images: Tensor, labels: Tensor) -> Replay:
        return BufferReplay(images, labels)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- `compile: auto` (compiling.py), for engines with a `compile` setting ----------------------------
    def planned_steps(self, n: int) -> tuple[int, int]:
        """The compiled phase's steps at a boundary of `n` images, and their batch."""
        raise NotImplementedError

    def step_flops(self, teacher: nn.Module) -> float:
        """Forward FLOPs per sample of a step: the teacher's on one image."""
        device = next(teacher.parameters()).device
        return network_flops(teacher, torch.zeros(2, *self.image_shape, device=device))

    def compiles(self, teacher: nn.Module, n: int) -> bool:
        """Whether this boundary's synthesis runs compiled (`compile: true | false | auto`)."""
        steps, batch = self.planned_steps(n)
        return decide(self.compile, steps, batch, lambda: self.step_flops(teacher),
                      next(teacher.parameters()).device, self.stats.notes, self.name)
