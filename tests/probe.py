"""Callbacks that record what a run did, for the resume and hook tests (importable as `tests.probe` by the CLI)."""

from __future__ import annotations

import os

import lightning as L
import torch

from cl_inversion.loop.hooks import ContinualCallback


class StateProbe(L.Callback):
    """Records one random draw per finished task; resumed correctly, the list matches an uninterrupted run."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draws.append(float(torch.rand(())))

    def state_dict(self) -> dict:
        return {"draws": list(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        self.draws = list(state["draws"])



class SynthesisCrash(ContinualCallback):
    """Raises KeyboardInterrupt (a Ctrl-C) at the boundary of task `$CL_TEST_CRASH_AT_TASK`, after the task's
    training: the run dies during its between-task work (synthesis). The config is the same with or without."""

    def between_tasks(self, student, context) -> None:
        if os.environ.get("CL_TEST_CRASH_AT_TASK") == str(context.task):
            raise KeyboardInterrupt


class TeacherProbe(ContinualCallback):
    """Records what every hook's context says of the teacher (none, or the student's frozen previous model), of
    the classes seen and of whether the task is the last."""

    acts_between_tasks = False  # looks only

    def __init__(self) -> None:
        self.seen: list[list] = []

    def note(self, hook: str, student, context) -> None:
        teacher = context.teacher
        kind = ("none" if teacher is None else "previous" if teacher is student.previous else "other")
        frozen = teacher is not None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        self.seen.append([hook, context.task, kind, frozen, context.n_seen, context.is_last])

    def before_task(self, student, context) -> None:
        self.note("before_task", student, context)

    def between_tasks(self, student, context) -> None:
        self.note("between_tasks", student, context)

    def after_evaluation(self, student, context) -> None:
        self.note("after_evaluation", student, context)

    def results(self) -> dict:
        return {"teacher_probe": self.seen}
