"""The image-folder cache follows the folder's file list, and an undecodable image fails naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cl_inversion.data.datasets import imagefolder
from cl_inversion.utils.errors import ConfigError


def write_jpeg(path: Path, seed: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def tiny_folder(root: Path, train: int = 2, test: int = 1) -> Path:
    seed = 0
    for split, count in (("train", train), ("test", test)):
        for name in ("cat", "dog"):
            for i in range(count):
                write_jpeg(root / split / name / f"{i}.jpg", seed)
                seed += 1
    return root


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("CL_INVERSION_CACHE", str(directory))
    return directory


def test_adding_an_image_invalidates_the_cache(tmp_path, cache_dir):
    root = tiny_folder(tmp_path / "data")
    first = imagefolder(str(root), augment=False)
    assert len(first.train) == 4 and len(first.test) == 2
    assert len(list(cache_dir.glob("*.pt"))) == 1
    assert len(imagefolder(str(root), augment=False).train) == 4  # served from the cache

    write_jpeg(root / "train" / "dog" / "9.jpg", seed=100)
    second = imagefolder(str(root), augment=False)
    assert len(second.train) == 5 and second.train.targets.tolist().count(1) == 3
    assert len(list(cache_dir.glob("*.pt"))) == 2

    (root / "test" / "cat" / "0.jpg").unlink()
    assert len(imagefolder(str(root), augment=False).test) == 1


def test_replacing_an_image_invalidates_the_cache(tmp_path, cache_dir):
    root = tiny_folder(tmp_path / "data")
    before = imagefolder(str(root), augment=False).train.images.clone()
    target = root / "train" / "cat" / "0.jpg"
    stat = target.stat()
    write_jpeg(target, seed=999)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a distinct mtime, whatever the fs
    after = imagefolder(str(root), augment=False).train.images
    assert not bool((after[0] == before[0]).all())
    assert bool((after[1:] == before[1:]).all())


@pytest.mark.parametrize("cache", [True, False])
def test_truncated_jpeg_fails_naming_the_file(tmp_path, cache_dir, cache):
    root = tiny_folder(tmp_path / "data")
    bad = root / "train" / "dog" / "1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as info:
        imagefolder(str(root), cache=cache)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message
    assert not list(cache_dir.glob("*.pt"))  # nothing cached from a failed decode


def test_not_an_image_fails_naming_the_file(tmp_path, cache_dir):
    root = tiny_folder(tmp_path / "data")
    junk = root / "test" / "cat" / "notes.txt"
    junk.write_text("not an image\n")
    with pytest.raises(ConfigError, match="notes.txt"):
        imagefolder(str(root))


def test_decoding_a_folder_logs_its_progress_and_the_cache_is_quiet(tmp_path, cache_dir, caplog, monkeypatch):
    import cl_inversion.data.datasets as datasets

    root = tiny_folder(tmp_path / "data", train=3)
    monkeypatch.setattr(datasets, "DECODE_LINE_S", 0.0)  # a progress line at every image
    with caplog.at_level("INFO", logger="cl_inversion"):
        imagefolder(str(root), augment=False)
    lines = [r.getMessage() for r in caplog.records]
    train = str(root / "train")
    assert f"decoding 6 images of {train} (once: later runs read the decoded cache)" in lines
    assert any(line.startswith(f"decoding {train}: 3/6 images") for line in lines)
    assert any(line.startswith(f"decoded 6 images of {train} in ") for line in lines)
    assert any(line.startswith(f"decoded 2 images of {root / 'test'} in ") for line in lines)
    caplog.clear()
    with caplog.at_level("INFO", logger="cl_inversion"):
        imagefolder(str(root), augment=False)  # from the cache: nothing decoded
    assert not [r for r in caplog.records if "decod" in r.getMessage()]
