"""Checkpoints and resume after a kill or a SLURM requeue.

A run writes `checkpoints/task_<t>.ckpt` (atomic, see `utils/io.py`) after every task. It continues from the
newest one when

* `resume=true` (an error if there is none), or
* the job was requeued by SLURM (`SLURM_RESTART_COUNT` > 0; submitit's preemption/timeout handling
  requeues the same job with the same arguments, and Hydra's submitit launcher gives it the same run
  directory) and the run directory holds a checkpoint: nothing is started over.

Randomness after a resume matches an uninterrupted run because every task reseeds everything
(`task_seed(seed, t)` in `loop/task_loop.py`: global RNGs, dataloader shuffles, augmentation, head init), so the
RNG state at the start of task t depends on (seed, t) alone, not on what ran before.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_inversion.loop.hooks import ContinualCallback
from cl_inversion.methods.base import ContinualModule
from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.io import CHECKPOINT_FORMAT, CorruptCheckpointError, load_checkpoint

log = logging.getLogger("cl_inversion")


def checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoints/task_<t>.ckpt` of a run, oldest task first."""
    found = [p for p in Path(run_dir).glob("checkpoints/task_*.ckpt") if p.stem.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def slurm_restarts() -> int:
    """How often SLURM has requeued this job (0 outside SLURM or on the first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def find_resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start (see the module docstring)."""
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise ConfigError(f"resume=true but {Path(run_dir) / 'checkpoints'} holds no task_<t>.ckpt; set "
                          "hydra.run.dir to the directory of the run to continue, or drop resume=true")
    if not resume and latest is not None and slurm_restarts() > 0:
        log.info(f"SLURM requeue (SLURM_RESTART_COUNT={slurm_restarts()}): continuing the run in {run_dir}")
        return latest
    return latest if resume else None


def load_resume_state(latest: Path, fallback: bool = False) -> tuple[dict[str, Any], Path]:
    """Load `latest`; a corrupted file is an error unless `fallback`, which sets it aside as
    `<name>.corrupt` and tries the checkpoints before it, newest first."""
    if not fallback:
        return load_checkpoint(latest), latest
    newest_first = list(reversed(checkpoints(latest.parent.parent)))
    for path in newest_first[newest_first.index(latest):] if latest in newest_first else [latest]:
        try:
            return load_checkpoint(path), path
        except CorruptCheckpointError as err:
            log.warning(f"{err}; resume_fallback=true: moving it to {path.name}.corrupt and trying the one before")
            path.replace(path.with_name(path.name + ".corrupt"))
    raise CorruptCheckpointError(f"no intact checkpoint left in {latest.parent} to resume from")


def checkpoint_state(method: ContinualModule, task: int, results: dict[str, Any],
                     callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Everything a resumed run needs after `task`: weights, head sizes, method and callback state, and the
    results so far (results.json's form)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "task": task,
        "task_sizes": list(method.task_sizes),
        "net": method.net.state_dict(),
        "method": method.extra_state(),
        "results": results,
        "callbacks": callback_states(callbacks or []),
    }


def restore(method: ContinualModule, state: dict[str, Any], callbacks: list[Any] | None = None,
            source: Path | str = "checkpoint", is_last: bool = False) -> None:
    """Put a method (and the run's callbacks) back in their state after `state['task']` (`is_last`: that task
    is the sequence's last)."""
    method.restore(state["task_sizes"], state["task"], state["net"], state["method"], is_last)
    load_callback_states(callbacks or [], state.get("callbacks", {}), source)
    for cb in callbacks or []:
        if isinstance(cb, ContinualCallback):
            cb.on_restore(method, is_last)


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between a checkpoint's config and this start's (what may change on resume
    is ignored: resume, resume_fallback, overwrite, experiment_name)."""
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("resume", "resume_fallback", "experiment_name", "overwrite"):
            keys.append(f"{prefix}{key}")
    return keys


def callback_states(callbacks: Iterable[object]) -> dict[str, Any]:
    """The state of every callback of the run that has `state_dict()` and `load_state_dict()`.

    Contract for callbacks that live across tasks (synthetic replay buffers, generators, feature
    Gaussians): return from `state_dict()` what a resumed run needs (tensors, plain Python objects);
    it is saved with the model in `checkpoints/task_<t>.ckpt` under `checkpoint["callbacks"][<class
    name>]` after task t has finished (after `on_fit_end` and evaluation). On resume the callback is
    constructed from the config as usual and `load_state_dict(state)` is called with that state
    before the next task's `Trainer.fit`. A second instance of the same class is stored as `<name>_1`.
    """
    states: dict[str, Any] = {}
    for key, callback in _keyed(callbacks):
        states[key] = callback.state_dict()
    return states


def load_callback_states(callbacks: Iterable[object], states: dict[str, Any], source: Path | str) -> None:
    """Inverse of `callback_states`; a stateful callback without a saved state is an error."""
    for key, callback in _keyed(callbacks):
        if key not in states:
            raise ConfigError(f"checkpoint {source} holds no state for callback {key}; callbacks cannot be "
                              "added to a run that has started (start a new run instead)")
        callback.load_state_dict(states[key])


def _keyed(callbacks: Iterable[object]) -> Iterator[tuple[str, Any]]:
    counts: dict[str, int] = {}
    for callback in callbacks:
        if not (callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict",
                                                                                     None))):
            continue
        name = type(callback).__name__
        n = counts.get(name, 0)
        counts[name] = n + 1
        yield (name if n == 0 else f"{name}_{n}"), callback


# --- random state at a task boundary -------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states: a run resumed between training and synthesis
    continues with the randomness an uninterrupted run would have had there."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
