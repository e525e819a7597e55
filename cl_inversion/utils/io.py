"""Atomic file writes: a reader (or a killed job) never sees a half-written results file or checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cl_inversion.utils.errors import UserError


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda h: h.write(json.dumps(data, indent=2, allow_nan=True).encode()))


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda h: torch.save(data, h))


class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be read completely; the message names the file."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, or fail naming the file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, unpickling error, ...
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupted ({type(err).__name__}); set resume_fallback=true "
            "to continue from the newest intact checkpoint before it, or start a new run") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCheckpointError(f"checkpoint {path} is not a cl_inversion checkpoint")
    return data


CHECKPOINT_FORMAT = "cl_inversion/1"
