"""Datasets as in-memory tensors with a normalisation the inversion engines can undo.

Every dataset is loaded once into a `TensorImageDataset` (uint8 or float images + int targets) so that
per-epoch cost is tensor augmentation only, never JPEG decoding or PIL conversions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.io import save_checkpoint

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
log = logging.getLogger("cl_inversion")
DECODE_LINE_S = 10.0  # seconds between decode progress lines
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 (ABD dataloaders/utils.py `dataset_stats`)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100, same source
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class TensorImageDataset(Dataset):
    """Images (uint8 in [0,255] or float in [0,1]) + targets; normalises and augments on access."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.images = images
        self.targets = targets.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.augment is not None:
            image = self.augment(image)
        return (image - self.mean) / self.std, self.targets[index]

    def with_targets(self, targets: Tensor) -> TensorImageDataset:
        """Same images, relabelled (the scenario maps class ids to their position in the class order)."""
        return TensorImageDataset(self.images, targets, self.mean.flatten().tolist(),
                                  self.std.flatten().tolist(), self.augment)


CROP_FILLS = ("zero", "mean")


def crop_flip(padding: int = 4, color_jitter: bool = False,
              fill: Sequence[float] | None = None) -> Callable[[Tensor], Tensor]:
    """Random crop with zero padding + horizontal flip: the CIFAR augmentation of R-DFCIL (`datamodule.py`);
    `color_jitter` puts ABD's `ColorJitter(brightness=63/255, contrast=0.8)` first (ABD
    `dataloaders/utils.py` `get_transform`). `fill` (per-channel pixel values) pads with them instead of 0: the
    dataset mean is what padding *after* normalisation gives (PMI's `seq_cifar100.py`: Normalize, then
    RandomCrop(padding=4))."""
    jitter = abd_color_jitter() if color_jitter else None
    fill_value = None if fill is None else torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1)

    def augment(image: Tensor) -> Tensor:
        if jitter is not None and image.shape[0] == 3:
            image = jitter(image)
        _, h, w = image.shape
        padded = torch.nn.functional.pad(image, (padding,) * 4)
        if fill_value is not None:
            border = torch.ones_like(image[:1])
            border = 1 - torch.nn.functional.pad(border, (padding,) * 4)
            padded = padded + border * fill_value
        top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
        image = padded[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image

    return augment


@dataclass
class DatasetBundle:
    """What a scenario needs from a dataset."""

    name: str
    train: TensorImageDataset
    test: TensorImageDataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def pixel_range(self) -> tuple[Tensor, Tensor]:
        """Per-channel (low, high) of normalised pixels: the box synthetic images are clamped to."""
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std


def abd_color_jitter() -> Callable[[Tensor], Tensor]:
    """ABD's `ColorJitter(brightness=63/255, contrast=0.8)` (`dataloaders/utils.py` `get_transform`) alone."""
    from torchvision.transforms import ColorJitter

    return ColorJitter(brightness=63 / 255, contrast=0.8)


def digits(test_fraction: float = 0.25, split_seed: int = 0, color_jitter: bool = False,
           crop_fill: str = "zero") -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), stratified train/test split.
    `color_jitter` adds ABD's brightness/contrast jitter to the training images (no crop or flip at 8x8, so
    `crop_fill` is only checked: a CIFAR preset that sets it composes with `+smoke=digits`)."""
    crop_fill_values(crop_fill, (0.0,))
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    targets = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=test_fraction, stratify=data.target, random_state=split_seed
    )
    mean, std = (float(images[train_idx].mean()),), (float(images[train_idx].std()),)
    return DatasetBundle(
        name="digits",
        train=TensorImageDataset(images[train_idx], targets[train_idx], mean, std,
                                 abd_color_jitter() if color_jitter else None),
        test=TensorImageDataset(images[test_idx], targets[test_idx], mean, std),
        class_names=list(DIGIT_NAMES),
        mean=mean,
        std=std,
    )


def _check_root(root: str | os.PathLike, field: str, how_to_get: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"{field}={str(root)!r} does not exist; {how_to_get}")
    return path


def crop_fill_values(crop_fill: str, mean: Sequence[float]) -> Sequence[float] | None:
    if crop_fill not in CROP_FILLS:
        raise ConfigError(f"dataset.crop_fill={crop_fill!r}: choose one of {', '.join(CROP_FILLS)}")
    return tuple(mean) if crop_fill == "mean" else None


def _cifar(name: str, root: str, download: bool, augment: bool, color_jitter: bool = False,
           crop_fill: str = "zero") -> DatasetBundle:
    import torchvision

    if not download:
        _check_root(root, "dataset.root", "set dataset.download=true to fetch it, or point dataset.root "
                    f"at the folder holding torchvision's extracted {name} archive")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise ConfigError(f"dataset.root={root!r}: {err} Set dataset.download=true to fetch {name}.") from None

    def as_tensor(split) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(split.targets)

    (xtr, ytr), (xte, yte) = as_tensor(train), as_tensor(test)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    fill = crop_fill_values(crop_fill, mean)
    return DatasetBundle(
        name=name,
        train=TensorImageDataset(xtr, ytr, mean, std,
                                 crop_flip(color_jitter=color_jitter, fill=fill) if augment else None),
        test=TensorImageDataset(xte, yte, mean, std),
        class_names=list(train.classes),
        mean=mean,
        std=std,
    )


def cifar10(root: str = "data", download: bool = False, augment: bool = True,
            color_jitter: bool = False, crop_fill: str = "zero") -> DatasetBundle:
    """torchvision CIFAR-10 (set `download=true` to fetch it into `root`)."""
    return _cifar("cifar10", root, download, augment, color_jitter, crop_fill)


def cifar100(root: str = "data", download: bool = False, augment: bool = True,
             color_jitter: bool = False, crop_fill: str = "zero") -> DatasetBundle:
    """torchvision CIFAR-100 (set `download=true` to fetch it into `root`)."""
    return _cifar("cifar100", root, download, augment, color_jitter, crop_fill)


def _folder_files(folder: Path, class_names: list[str]) -> list[tuple[int, Path]]:
    """(label, file) of every image `_decode_folder` reads, in its order."""
    return [(label, file) for label, name in enumerate(class_names) for file in sorted((folder / name).iterdir())]


def _folder_fingerprint(base: Path, class_names: list[str]) -> str:
    """Hash of the train/ and test/ file lists (relative names, sizes, mtimes): any added, removed or
    replaced image changes it, so the decoded-tensor cache is never stale."""
    digest = hashlib.sha1()
    for split in ("train", "test"):
        for label, file in _folder_files(base / split, class_names):
            st = file.stat()
            digest.update(f"{label}|{file.relative_to(base).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode_folder(folder: Path, class_names: list[str], image_size: int | None) -> tuple[Tensor, Tensor]:
    """Decode every image of `folder` (one log line at the start, one every `DECODE_LINE_S` seconds and
    one at the end: a first run on a large folder is not silent)."""
    from PIL import Image

    files = _folder_files(folder, class_names)
    began = last_line = time.monotonic()
    log.info(f"decoding {len(files)} images of {folder} (once: later runs read the decoded cache)")
    images, targets = [], []
    for done, (label, file) in enumerate(files):
        if time.monotonic() - last_line >= DECODE_LINE_S:
            last_line = time.monotonic()
            log.info(f"decoding {folder}: {done}/{len(files)} images, {last_line - began:.0f}s")
        try:
            with Image.open(file) as img:
                img = img.convert("RGB")
                if image_size is not None and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
        except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated/corrupt file, not an image
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"dataset.root: cannot decode image {str(file)!r} ({reason}); "
                              "remove or replace that file") from None
        targets.append(label)
    log.info(f"decoded {len(files)} images of {folder} in {time.monotonic() - began:.1f}s")
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(targets)


def _cache_file(base: Path, image_size: int | None, class_names: list[str]) -> Path:
    """Where the decoded tensors of `base` at `image_size` are kept, keyed on its file list."""
    files = _folder_fingerprint(base, class_names)
    key = hashlib.sha1(f"{base.resolve()}|{image_size}|{class_names}|{files}".encode()).hexdigest()[:16]
    return Path(os.environ.get("CL_INVERSION_CACHE", "~/.cache/cl_inversion")).expanduser() / f"{key}.pt"


def per_class_subset(targets: Tensor, per_class: int, seed: int) -> Tensor:
    """Sorted indices of a seeded random choice of up to `per_class` samples of every class."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    chosen = [order[targets[order] == c][:per_class] for c in targets.unique().tolist()]
    return torch.cat(chosen).sort().values


def imagefolder(
    root: str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = True,
    cache: bool = True,
    train_per_class: int | None = None,
    subset_seed: int = 0,
    color_jitter: bool = False,
    crop_fill: str = "zero",
) -> DatasetBundle:
    """Any `root/train/<class>/*` + `root/test/<class>/*` tree (CIFAR-10 JPEG copy, Tiny-ImageNet...).

    Images are decoded once; with `cache=true` the decoded uint8 tensors are kept in
    `$CL_INVERSION_CACHE` (default `~/.cache/cl_inversion`) keyed by the folder's path, `image_size` and
    its file list (names, sizes, mtimes: adding, removing or replacing an image rebuilds it), so later runs
    start in a second. A file PIL cannot decode fails with a `ConfigError` naming it.
    `train_per_class` keeps a seeded random subset of that many training images per class (CPU budgets);
    the test split is always whole.
    """
    base = _check_root(root, "dataset.root", "point it at a folder holding train/<class>/*.jpg and test/<class>/*.jpg "
                       "(e.g. Tiny-ImageNet with val/ sorted into test/<class>/, or the CIFAR-10 JPEG copy "
                       "in ../shared/datasets/cifar10)")
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise ConfigError(f"dataset.root={root!r} has no {split}/ folder of class sub-folders")
    class_names = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    cache_file = _cache_file(base, image_size, class_names) if cache else None
    if cache_file is not None and cache_file.exists():
        blob = torch.load(cache_file)
    else:
        blob = {
            "train": _decode_folder(base / "train", class_names, image_size),
            "test": _decode_folder(base / "test", class_names, image_size),
        }
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(cache_file, blob)  # atomic: temp file + fsync + rename
    (xtr, ytr), (xte, yte) = blob["train"], blob["test"]
    if train_per_class is not None:
        if train_per_class < 1:
            raise ConfigError(f"dataset.train_per_class={train_per_class}: must be a positive count or null")
        keep = per_class_subset(ytr, train_per_class, subset_seed)
        xtr, ytr = xtr[keep], ytr[keep]
    if mean is None or std is None:
        sample = xtr[:: max(1, len(xtr) // 5000)].float().div(255)
        mean = tuple(sample.mean(dim=(0, 2, 3)).tolist())
        std = tuple(sample.std(dim=(0, 2, 3)).tolist())
    mean, std = tuple(mean), tuple(std)
    fill = crop_fill_values(crop_fill, mean)
    return DatasetBundle(
        name=base.name,
        train=TensorImageDataset(xtr, ytr, mean, std,
                                 crop_flip(color_jitter=color_jitter, fill=fill) if augment else None),
        test=TensorImageDataset(xte, yte, mean, std),
        class_names=class_names,
        mean=mean,
        std=std,
    )
