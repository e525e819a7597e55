"""The class-incremental scenario: a seeded class order cut into tasks, one datamodule per task.

Labels are remapped to positions in the class order, so task t owns a contiguous range of outputs and
"classes seen so far" is always the first `n_seen` logits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from cl_inversion.data.datasets import DatasetBundle, TensorImageDataset
from cl_inversion.errors import ConfigError


def class_order_for(num_classes: int, seed: int | None) -> list[int]:
    """`random.seed(s); random.shuffle(range(C))` — the rule of ABD and R-DFCIL's CIFAR-100 orders."""
    order = list(range(num_classes))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def task_sizes(num_classes: int, n_tasks: int, first_task_classes: int | None = None) -> list[int]:
    """Classes per task: equal slices, or a larger first task and equal slices of the rest."""
    if not isinstance(n_tasks, int) or n_tasks <= 0 or n_tasks > num_classes:
        raise ConfigError(f"scenario.n_tasks={n_tasks} must be an integer in 1..{num_classes} "
                          f"(the dataset has {num_classes} classes)")
    if first_task_classes is None:
        if num_classes % n_tasks:
            raise ConfigError(f"scenario.n_tasks={n_tasks} does not divide the {num_classes} classes; "
                              f"choose a divisor or set scenario.first_task_classes")
        return [num_classes // n_tasks] * n_tasks
    rest = num_classes - first_task_classes
    if n_tasks == 1:
        if first_task_classes != num_classes:
            raise ConfigError(f"scenario.first_task_classes={first_task_classes} with scenario.n_tasks=1 "
                              f"must equal the number of classes ({num_classes})")
        return [num_classes]
    if not 0 < first_task_classes < num_classes or rest % (n_tasks - 1):
        raise ConfigError(
            f"scenario.first_task_classes={first_task_classes} is inconsistent with scenario.n_tasks="
            f"{n_tasks}: the remaining {rest} of {num_classes} classes must split evenly into "
            f"{n_tasks - 1} tasks")
    return [first_task_classes] + [rest // (n_tasks - 1)] * (n_tasks - 1)


@dataclass
class Task:
    index: int
    classes: list[int]  # labels after remapping: a contiguous range
    original_classes: list[int]  # dataset class ids


class ClassIncrementalScenario:
    """Splits a `DatasetBundle` into tasks of disjoint classes."""

    def __init__(
        self,
        dataset: DatasetBundle,
        n_tasks: int,
        first_task_classes: int | None = None,
        class_order_seed: int | None = 0,
        class_order: Sequence[int] | None = None,
    ) -> None:
        self.dataset = dataset
        c = dataset.num_classes
        if class_order is not None:
            class_order = list(class_order)
            if sorted(class_order) != list(range(c)):
                raise ConfigError(f"scenario.class_order must be a permutation of 0..{c - 1}")
        self.class_order = class_order or class_order_for(c, class_order_seed)
        self.class_order_seed = class_order_seed
        sizes = task_sizes(c, n_tasks, first_task_classes)
        position = torch.empty(c, dtype=torch.long)
        position[torch.tensor(self.class_order)] = torch.arange(c)
        self.train = dataset.train.with_targets(position[dataset.train.targets])
        self.test = dataset.test.with_targets(position[dataset.test.targets])
        self.tasks: list[Task] = []
        start = 0
        for t, size in enumerate(sizes):
            labels = list(range(start, start + size))
            self.tasks.append(Task(t, labels, [self.class_order[i] for i in labels]))
            start += size

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def class_names(self) -> list[str]:
        """Names in label order (label i is class_order[i])."""
        return [self.dataset.class_names[i] for i in self.class_order]

    def seen_classes(self, t: int) -> int:
        return sum(len(task.classes) for task in self.tasks[: t + 1])

    def _subset(self, split: TensorImageDataset, labels: Sequence[int]) -> Subset:
        mask = torch.isin(split.targets, torch.tensor(list(labels)))
        return Subset(split, mask.nonzero().flatten().tolist())

    def train_set(self, t: int, cumulative: bool = False) -> Subset:
        """Task t's training data; with `cumulative` all tasks up to t (the joint upper bound)."""
        tasks = self.tasks[: t + 1] if cumulative else [self.tasks[t]]
        return self._subset(self.train, [c for task in tasks for c in task.classes])

    def test_set(self, t: int) -> Subset:
        return self._subset(self.test, self.tasks[t].classes)

    def datamodule(self, t: int, batch_size: int, num_workers: int = 0, cumulative: bool = False,
                   seed: int = 0) -> TaskDataModule:
        return TaskDataModule(self, t, batch_size, num_workers, cumulative, seed)


class TaskDataModule(L.LightningDataModule):
    """Training data of one task (or all tasks so far) and the test sets of every task seen so far."""

    def __init__(self, scenario: ClassIncrementalScenario, task: int, batch_size: int,
                 num_workers: int = 0, cumulative: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.scenario = scenario
        self.task = task
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cumulative = cumulative
        self.seed = seed
        self.train_data = scenario.train_set(task, cumulative)

    def _loader(self, data, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=shuffle and len(data) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def test_dataloaders(self) -> list[DataLoader]:
        return [self._loader(self.scenario.test_set(j), shuffle=False) for j in range(self.task + 1)]

    def plain_train_dataloader(self) -> DataLoader:
        """Task t's training images without augmentation or shuffling (feature statistics, Fisher)."""
        split = self.scenario.train
        plain = TensorImageDataset(split.images, split.targets, split.mean.flatten().tolist(),
                                   split.std.flatten().tolist(), augment=None)
        return self._loader(Subset(plain, self.train_data.indices), shuffle=False)


def all_targets(subset: Subset) -> Tensor:
    return subset.dataset.targets[torch.tensor(subset.indices)]
