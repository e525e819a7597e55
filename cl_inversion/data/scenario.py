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
from cl_inversion.utils.errors import ConfigError


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


def _hold_out(order: list[int], holdout: int | Sequence[int]) -> tuple[list[int], int]:
    """Move held-out classes to the end of the class order: a count takes the last ones of the (seeded)
    order, a list names dataset class ids. Returns the new order and how many are held out."""
    c = len(order)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, Sequence)) or isinstance(holdout, str):
        raise ConfigError(f"scenario.holdout_classes={holdout!r} must be a count or a list of class ids")
    if isinstance(holdout, int):
        if not 0 <= holdout < c:
            raise ConfigError(f"scenario.holdout_classes={holdout} must be in 0..{c - 1} (the dataset has {c} "
                              "classes and at least one must be trained)")
        return list(order), holdout
    ids = list(holdout)
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) and 0 <= i < c for i in ids) or len(ids) >= c:
        raise ConfigError(f"scenario.holdout_classes={ids} must list distinct class ids in 0..{c - 1}, "
                          "leaving at least one class to train")
    return [i for i in order if i not in ids] + ids, len(ids)


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
        holdout_classes: int | Sequence[int] = 0,
    ) -> None:
        self.dataset = dataset
        c = dataset.num_classes
        if class_order is not None:
            class_order = list(class_order)
            if sorted(class_order) != list(range(c)):
                raise ConfigError(f"scenario.class_order must be a permutation of 0..{c - 1}")
        self.class_order = class_order or class_order_for(c, class_order_seed)
        self.class_order_seed = class_order_seed
        self.class_order, n_held = _hold_out(self.class_order, holdout_classes)
        try:
            sizes = task_sizes(c - n_held, n_tasks, first_task_classes)
        except ConfigError as err:
            if not n_held:
                raise
            raise ConfigError(f"{err} [{c - n_held} classes are trained: scenario.holdout_classes="
                              f"{holdout_classes} of the {c} are held out]") from None
        #: labels (positions in the class order) and dataset ids of classes no task trains (zero-shot tests)
        self.holdout_labels = list(range(c - n_held, c))
        self.holdout_classes = self.class_order[c - n_held :]
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

    def holdout_test_set(self) -> Subset:
        """Test data of the held-out classes (labels `holdout_labels`), never part of any task."""
        return self._subset(self.test, self.holdout_labels)

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

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The dataset's per-channel (mean, std) that its images are normalised with."""
        return self.scenario.dataset.mean, self.scenario.dataset.std

    @property
    def task_class_names(self) -> list[str]:
        """Names of this task's classes, in label order (what a text-initialised head embeds)."""
        return [self.scenario.class_names[i] for i in self.scenario.tasks[self.task].classes]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def test_dataloaders(self) -> list[DataLoader]:
        return [self._loader(self.scenario.test_set(j), shuffle=False) for j in range(self.task + 1)]

    def augmented_train_dataloader(self) -> DataLoader:
        """Task t's training images with their training augmentation, in order, none dropped (the features PMI's
        feature model is fitted on)."""
        return DataLoader(self.train_data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def plain_train_dataloader(self) -> DataLoader:
        """Task t's training images without augmentation or shuffling (feature statistics, Fisher)."""
        split = self.scenario.train
        plain = TensorImageDataset(split.images, split.targets, split.mean.flatten().tolist(),
                                   split.std.flatten().tolist(), augment=None)
        return self._loader(Subset(plain, self.train_data.indices), shuffle=False)


def all_targets(subset: Subset) -> Tensor:
    return subset.dataset.targets[torch.tensor(subset.indices)]
