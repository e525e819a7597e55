"""The loop's hooks: what a between-task step sees (`TaskContext`), what it may use of the method (`Student`), and
`ContinualCallback` — a Lightning `Callback` with the task loop's own hooks, which the loop calls in the main
process (so they also work under `ddp_spawn`, where fit runs in worker processes) once per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor, nn

from cl_inversion.utils.errors import TrainingDiverged


@runtime_checkable
class Student(Protocol):
    """What a callback may use of the method being trained (`methods.base.ContinualModule` provides it)."""

    net: nn.Module
    # the frozen model of the last task learned, for methods that keep one (made by the method's `end_task`,
    # remade from the checkpoint on resume); the loop hands it to the hooks as `TaskContext.teacher`
    previous: nn.Module | None
    n_seen: int  # classes seen so far, the current task's included

    def frozen_copy(self) -> nn.Module: ...


@runtime_checkable
class ReplayStudent(Student, Protocol):
    """A student that replays what a synthesis engine made (`methods.inversion_student.InversionStudent`)."""

    n_old: int  # classes of the tasks before the current one

    def receive_replay(self, replay: Any) -> None: ...


@dataclass
class TaskContext:
    """What a hook may need from the loop about the task just learned.

    `teacher` is the frozen copy of the model that learned the tasks up to `task` — what synthesis inverts and
    the student distils from during the next task: the method's `previous` (`Student`), the same module, made
    by the method's `end_task` before `between_tasks` and `after_evaluation`. At `before_task` it is still the
    previous task's (None before the first task); None throughout for a method that keeps no frozen model."""

    task: int
    run_dir: Path
    logger: Any
    datamodule: Any  # TaskDataModule of the task just learned (its real data is still available)
    image_shape: tuple[int, ...]
    pixel_range: tuple[Tensor, Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device = torch.device("cpu")  # where the task trained: synthesis runs there too
    is_last: bool = False  # the sequence's last task: no next task to replay for
    teacher: nn.Module | None = None  # the frozen model of the task just learned (see above)
    n_seen: int = 0  # classes of the tasks up to and including `task` (the teacher's outputs)


class ContinualCallback(L.Callback):
    """A Lightning callback that also takes part in the task loop: `before_task` (before a task's fit),
    `between_tasks` (after a task's fit and the method's own hook, before its evaluation and checkpoint) and
    `after_evaluation` (once the task's accuracy row is known); `results()` goes into results.json after each."""

    #: does work at `between_tasks` (the loop then checkpoints the task's training before calling it)
    acts_between_tasks: bool = True

    def before_task(self, student: Student, context: TaskContext) -> None:
        """Before the task's `Trainer.fit` (not called again for a task resumed after its training)."""

    def between_tasks(self, student: Student, context: TaskContext) -> None:
        """After the task's fit, before its evaluation and checkpoint (the inversion step)."""

    def after_evaluation(self, student: Student, context: TaskContext) -> None:
        """After the task's evaluation, before its record and checkpoint."""

    def results(self) -> dict[str, Any]:
        """Entries merged into results.json."""
        return {}

    def on_restore(self, student: Student, is_last: bool) -> None:
        """After resume loaded the method and this callback's state: re-attach what the method uses."""


class FiniteLossGuard(L.Callback):
    """Stops the run at the first NaN or infinite training loss, naming task, epoch and step (a diverged
    run would otherwise train on and end `completed` with chance accuracy)."""

    def __init__(self, task: int, n_tasks: int) -> None:
        self.task, self.n_tasks = task, n_tasks

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDiverged(
                f"training loss is {loss.detach().float().sum().item()} at task {self.task + 1}/{self.n_tasks}, "
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, step {batch_idx} of the epoch "
                f"(global step {trainer.global_step}); lower optimizer.lr or check the data and the method's "
                "loss weights")
