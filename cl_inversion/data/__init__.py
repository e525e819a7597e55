from cl_inversion.data.datasets import (
           DatasetBundle,
           TensorImageDataset,
           cifar10,
           cifar100,
           digits,
           imagefolder,
)
from cl_inversion.data.scenario import ClassIncrementalScenario, TaskDataModule, class_order_for, task_sizes

__all__ = ["DatasetBundle", "TensorImageDataset", "ClassIncrementalScenario", "TaskDataModule",
           "class_order_for", "task_sizes", "cifar10", "cifar100", "digits", "imagefolder"]
