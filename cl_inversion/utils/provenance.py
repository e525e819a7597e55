"""What produced a result: package and library versions, the git commit, the device, wall-clock times."""

from __future__ import annotations

import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def git_commit(path: Path) -> dict[str, Any] | None:
    """`{"commit": sha, "dirty": bool}` of the checkout holding `path`, or None outside a git work tree."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def provenance(device: str) -> dict[str, Any]:
    import platform

    import torch

    return {
        "cl_inversion": _version("cl_inversion"),
        "git": git_commit(Path(__file__).resolve().parent),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "hydra": _version("hydra-core"),
        "python": platform.python_version(),
        "device": device,
        "host": platform.node(),
        "started_at": now(),
    }
