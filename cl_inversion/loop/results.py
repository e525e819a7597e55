"""`RunResults`: what a run records — the accuracy matrices, the summary numbers, per-task records,
provenance — and its `results.json` form (`to_dict` / `from_dict`; the file's keys are listed in the README).

Entries contributed by callbacks (`inversion`: one record per synthesis) and by CLIP backbones
(`zero_shot_accuracy`, `zero_shot_classes`) live in `extra` and appear at the top level of the JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cl_inversion.loop.metrics import SUMMARY_KEYS, Evaluation, summary

#: fields written only once they have a value (a run that has not finished a task has no wall time)
OPTIONAL = ("wall_s", "carried_state_bytes", "error")


@dataclass
class TaskRecord:
    """`per_task[t]`: the evaluation after task t and what the task cost."""

    task: int
    classes: list[int]
    accuracy: list[float]
    average_accuracy: float
    old_class_accuracy: float | None
    new_class_accuracy: float
    train_time_s: float
    wall_s: float  # training, synthesis and evaluation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """A `per_task` entry of results.json (missing fields of older or hand-made files read as None)."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass
class RunResults:
    method: str | None = None
    dataset: str | None = None
    backbone: str | None = None
    n_tasks: int | None = None
    class_order: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    seed: int | None = None
    class_order_seed: int | None = None
    threads: int | None = None
    config: dict[str, Any] | None = None
    status: str = "running"  # running | completed | failed | interrupted
    tasks_completed: int = 0
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    task_aware_matrix: list[list[float]] = field(default_factory=list)
    per_task: list[TaskRecord] = field(default_factory=list)
    summary: dict[str, float | None] = field(default_factory=dict)  # metrics.summary, flat in the JSON
    provenance: dict[str, Any] | None = None
    wall_s: float | None = None
    carried_state_bytes: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def add_task(self, record: TaskRecord, evaluation: Evaluation, last: bool) -> None:
        """Append task `record.task`'s row and refresh the summary numbers."""
        self.accuracy_matrix.append(evaluation.accuracy)
        self.task_aware_matrix.append(evaluation.task_aware)
        self.per_task.append(record)
        self.wall_s = (self.wall_s or 0.0) + record.wall_s
        self.summary = summary(self.accuracy_matrix, self.task_aware_matrix, evaluation)
        self.tasks_completed = record.task + 1
        self.status = "completed" if last else "running"

    def to_dict(self) -> dict[str, Any]:
        """The results.json object."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("summary", "extra")}
        data["per_task"] = [asdict(r) for r in self.per_task]
        for key in OPTIONAL:
            if data[key] is None:
                del data[key]
        return {**data, **self.summary, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResults:
        """Inverse of `to_dict` (a checkpoint's results, a results.json; unknown keys go to `extra`; a file
        without a status reads as "unknown")."""
        names = {f.name for f in fields(cls)} - {"summary", "extra", "per_task"}
        results = cls(**{k: v for k, v in data.items() if k in names})
        results.status = data.get("status", "unknown")
        results.per_task = [TaskRecord.from_dict(r) for r in data.get("per_task") or [] if isinstance(r, dict)]
        results.summary = {k: data[k] for k in SUMMARY_KEYS if k in data}
        results.extra = {k: v for k, v in data.items() if k not in names | {"per_task"} | set(SUMMARY_KEYS)}
        return results

    def __getitem__(self, key: str) -> Any:
        """`results["final_accuracy"]`: the results.json view, for notebooks."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)
