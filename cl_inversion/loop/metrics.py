"""The accuracy matrix and the summary numbers papers report, all in percent.

`A[i][j]` is the accuracy on task j's test data after training task i (j ≤ i); row i has i+1 entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cl_inversion.utils.nn_utils import eval_mode

Matrix = Sequence[Sequence[float]]


def final_average_accuracy(matrix: Matrix) -> float:
    """Mean of the last row: accuracy over all tasks after the last one (the number papers report)."""
    return sum(matrix[-1]) / len(matrix[-1])


def average_incremental_accuracy(matrix: Matrix) -> float:
    """Mean over tasks i of the mean of row i (Rebuffi et al., iCaRL)."""
    return sum(sum(row) / len(row) for row in matrix) / len(matrix)


def forgetting(matrix: Matrix) -> float:
    """Mean over j < T of (best accuracy on j before the last task − accuracy on j after it)."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Matrix) -> float:
    """Mean over j < T of (accuracy on j after the last task − accuracy on j right after learning it)."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last


@dataclass
class Evaluation:
    """One row of results: per-task accuracies plus the class-group accuracies after task i."""

    accuracy: list[float]  # task-agnostic, one per seen task
    task_aware: list[float]  # logits masked to each task's classes
    old_class_accuracy: float | None  # over all test samples of earlier tasks' classes
    new_class_accuracy: float  # over the current task's test samples


@torch.no_grad()
def predict(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    logits, targets = [], []
    for x, y in loader:
        logits.append(net(x.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def evaluate(net: nn.Module, test_loaders: Sequence[DataLoader], task_classes: Sequence[Sequence[int]],
             device: torch.device | str = "cpu") -> Evaluation:
    """Evaluate `net` on the test set of every task seen so far (one head over all seen classes)."""
    device = torch.device(device)
    with eval_mode(net):
        outputs = [predict(net, loader, device) for loader in test_loaders]

    def percent(preds: Tensor, target: Tensor) -> float:
        return 100.0 * int((preds == target).sum()) / max(len(target), 1)

    agnostic = [percent(logits.argmax(1), y) for logits, y in outputs]
    aware = []
    for (logits, y), classes in zip(outputs, task_classes):
        masked = torch.full_like(logits, float("-inf"))
        masked[:, classes] = logits[:, classes]
        aware.append(percent(masked.argmax(1), y))
    old = None
    if len(outputs) > 1:
        old_logits = torch.cat([o[0] for o in outputs[:-1]])
        old = percent(old_logits.argmax(1), torch.cat([o[1] for o in outputs[:-1]]))
    return Evaluation(agnostic, aware, old, agnostic[-1])


SUMMARY_KEYS = ("final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer",
                "old_class_accuracy", "new_class_accuracy", "task_aware_accuracy")


def summary(matrix: Matrix, task_aware_matrix: Matrix, last: Evaluation) -> dict[str, float | None]:
    """The scalar results of a run (or of the tasks completed so far)."""
    return {
        "final_accuracy": final_average_accuracy(matrix),
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "backward_transfer": backward_transfer(matrix),
        "old_class_accuracy": last.old_class_accuracy,
        "new_class_accuracy": last.new_class_accuracy,
        "task_aware_accuracy": final_average_accuracy(task_aware_matrix),
    }
