"""A random-pixel stand-in for CIFAR-100, for timing a preset where the real archive cannot be fetched
(the GPU machine of `benchmarks/device_check.sh` has no network).

    python -m cl_inversion experiment=abd_cifar100_10t dataset._target_=benchmarks.stand_in_data.cifar100_shaped

Same shapes, class count, normalisation and augmentation as `cl_inversion.data.cifar100`: every step
costs what it costs on the real data; accuracies mean nothing.
"""

from __future__ import annotations

import torch

from cl_inversion.data.datasets import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DatasetBundle,
    TensorImageDataset,
    crop_fill_values,
    crop_flip,
)


def cifar100_shaped(root: str = "data", download: bool = False, augment: bool = True, color_jitter: bool = False,
                    crop_fill: str = "zero", n_train: int = 50_000, n_test: int = 10_000,
                    seed: int = 0) -> DatasetBundle:
    """CIFAR-100's 100 classes of 3x32x32 uint8 images, pixels uniform random (root/download unused)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 100

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return DatasetBundle(
        name="cifar100_shaped",
        train=TensorImageDataset(xtr, ytr, CIFAR100_MEAN, CIFAR100_STD,
                                 crop_flip(color_jitter=color_jitter, fill=crop_fill_values(crop_fill, CIFAR100_MEAN))
                                 if augment else None),
        test=TensorImageDataset(xte, yte, CIFAR100_MEAN, CIFAR100_STD),
        class_names=[f"class_{c}" for c in range(100)],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )
