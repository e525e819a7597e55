"""Zero-shot retention: how much pre-trained (image-text) knowledge survives continual training.

For a backbone with a text tower (CLIP), `ZeroShotRetention` records in results.json `zero_shot_accuracy`:
the accuracy of CLIP's zero-shot classifier — text embeddings of the held-out class names, never the
trained head — on the test data of the held-out classes (`scenario.holdout_classes`, which no task
trains), before the first task (index 0) and after every task's evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cl_inversion.loop.hooks import ContinualCallback, Student, TaskContext
from cl_inversion.utils.nn_utils import eval_mode

log = logging.getLogger("cl_inversion")


@torch.no_grad()
def zero_shot_accuracy(backbone: nn.Module, loader: DataLoader, class_names: list[str], label_offset: int,
                       device: torch.device) -> float:
    """Accuracy (%) of the text-embedding classifier over `class_names`; label i ↔ class_names[i - offset]."""
    correct = total = 0
    with eval_mode(backbone):
        text = backbone.text_embeddings(class_names).to(device)
        for x, y in loader:
            preds = backbone.zero_shot_logits(x.to(device), text).argmax(1).cpu()
            correct += int((preds == y - label_offset).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


def embeds_text(backbone: nn.Module) -> bool:
    """A backbone with a text tower (CLIP): zero-shot retention can be measured."""
    return hasattr(backbone, "text_embeddings")


class ZeroShotRetention(ContinualCallback):
    """The loop's zero-shot measurement (built for backbones that `embeds_text`); its list is checkpointed."""

    acts_between_tasks = False

    def __init__(self, scenario: Any, batch_size: int) -> None:
        self.scenario, self.batch_size = scenario, batch_size
        self.record: dict[str, Any] = {}

    def before_task(self, student: Student, context: TaskContext) -> None:
        if context.task == 0:  # the pre-trained model's accuracy, before any training
            record_zero_shot(self.record, student.net.backbone, self.scenario, self.batch_size, context.device)

    def after_evaluation(self, student: Student, context: TaskContext) -> None:
        record_zero_shot(self.record, student.net.backbone, self.scenario, self.batch_size, context.device)

    def results(self) -> dict[str, Any]:
        return dict(self.record)

    def state_dict(self) -> dict[str, Any]:
        return {"record": self.record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.record = state["record"]


def record_zero_shot(results: dict[str, Any], backbone: nn.Module, scenario: Any, batch_size: int,
                     device: torch.device) -> None:
    """Append one zero-shot accuracy (None without held-out classes) to `results`."""
    results["zero_shot_classes"] = list(scenario.holdout_classes)
    accuracies = results.setdefault("zero_shot_accuracy", [])
    if not scenario.holdout_labels:
        if not accuracies:
            log.warning("zero_shot_accuracy is null: no class is held out of the sequence; set "
                        "scenario.holdout_classes (e.g. =2 with scenario.n_tasks=4 on digits)")
        accuracies.append(None)
        return
    backbone.to(device)
    loader = DataLoader(scenario.holdout_test_set(), batch_size=batch_size, shuffle=False)
    names = [scenario.class_names[i] for i in scenario.holdout_labels]
    accuracy = zero_shot_accuracy(backbone, loader, names, scenario.holdout_labels[0], device)
    accuracies.append(accuracy)
    log.info(f"zero-shot accuracy on held-out classes {names}: {accuracy:.2f}"
             + (" (before the first task)" if len(accuracies) == 1 else ""))
