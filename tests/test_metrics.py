import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cl_inversion.loop.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    evaluate,
    final_average_accuracy,
    forgetting,
)

MATRIX = [[90.0], [70.0, 80.0], [50.0, 60.0, 100.0]]


def test_final_average_accuracy():
    assert final_average_accuracy(MATRIX) == pytest.approx(70.0)


def test_average_incremental_accuracy():
    assert average_incremental_accuracy(MATRIX) == pytest.approx((90 + 75 + 70) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: best 90 -> 50 (40); task 1: best 80 -> 60 (20)
    assert forgetting(MATRIX) == pytest.approx(30.0)
    assert forgetting([[55.0]]) == 0.0


def test_backward_transfer():
    assert backward_transfer(MATRIX) == pytest.approx(((50 - 90) + (60 - 80)) / 2)


class FixedLogits(torch.nn.Module):
    """Returns the input as logits: lets a test choose predictions exactly."""

    def forward(self, x):
        return x


def test_evaluate_task_agnostic_vs_task_aware_and_class_groups():
    # 4 classes, tasks [0,1] and [2,3]. Task 0 samples: one right, one predicted as class 2 (wrong
    # task-agnostic, but right task-aware when class 1 beats class 0 within the task).
    t0 = TensorDataset(torch.tensor([[5.0, 1, 0, 0], [0.0, 1, 9, 0]]), torch.tensor([0, 1]))
    t1 = TensorDataset(torch.tensor([[0.0, 0, 3, 1], [0.0, 0, 1, 3], [0, 0, 0, 5.0]]), torch.tensor([2, 3, 2]))
    ev = evaluate(FixedLogits(), [DataLoader(t0), DataLoader(t1)], [[0, 1], [2, 3]])
    assert ev.accuracy == pytest.approx([50.0, 200 / 3])
    assert ev.task_aware == pytest.approx([100.0, 200 / 3])
    assert ev.old_class_accuracy == pytest.approx(50.0)
    assert ev.new_class_accuracy == pytest.approx(200 / 3)
