"""What a run reads from Hydra's runtime context when it runs under `hydra.main` (nothing otherwise)."""

from __future__ import annotations

import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig


def hydra_choices() -> dict[str, str]:
    """The config-group options picked (method=..., dataset=...) when running under Hydra's main."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """`run_dir` if given, else Hydra's output directory, else a timestamped one under outputs/."""
    if run_dir is not None:
        return Path(run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")
