"""The run directory: where a run writes (Hydra's output directory or a given one), claiming it, keeping Hydra's
record of the run that owns it, and leaving a failed run's status in its results.json."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cl_inversion.loop.checkpoints import checkpoints
from cl_inversion.utils.errors import ConfigError, user_error
from cl_inversion.utils.io import write_json

log = logging.getLogger("cl_inversion")


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


def failure_fields(err: BaseException) -> dict[str, str]:
    """`status` ("failed", or "interrupted" for a kill signal turned exception) and `error` for results.json."""
    status = "failed" if isinstance(err, Exception) else "interrupted"
    err = user_error(err) or err
    return {"status": status, "error": f"{type(err).__name__}: {err}"}


@contextmanager
def failure_recorded(results_path: Path, cfg: DictConfig) -> Iterator[None]:
    """If the run raises before it wrote a results.json, write one with the status and the error, so
    every job of a sweep leaves a record. An existing results.json (written by this run's task loop, or
    by another run in the same directory) is never touched here."""
    try:
        yield
    except BaseException as err:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if not Path(results_path).exists() and getattr(rank_zero_only, "rank", 0) == 0:
            try:
                config = OmegaConf.to_container(cfg, resolve=True)
            except Exception:
                config = None
            choices = hydra_choices()
            write_json(results_path, {**failure_fields(err), "tasks_completed": 0, "accuracy_matrix": [],
                                      "n_tasks": cfg.scenario.n_tasks, "seed": cfg.seed,
                                      **{k: choices.get(k) for k in ("method", "dataset", "backbone")},
                                      "config": config})
        raise


# --- a run directory holds one run --------------------------------------------------------------------
#: what a run writes into its directory (cleared by `overwrite=true`; nothing else there is touched)
RUN_OUTPUTS = ("results.json", "checkpoints", "logs", "inversion", "accuracy_matrix.png", "wandb",
               "lightning_logs", ".hydra_original")
HYDRA_RECORD = ".hydra_original"  # the .hydra files of the run's first start


def holds_a_run(run_dir: Path) -> bool:
    """A checkpoint, or a results.json with at least one finished task (a failed start records none)."""
    if checkpoints(run_dir):
        return True
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return False
    try:
        return int(json.loads(path.read_text()).get("tasks_completed", 0)) > 0
    except (ValueError, OSError):
        return True  # unreadable: treat as a run, never overwrite it silently


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a fresh start in a directory that holds a run (its later checkpoints would mix with ours);
    `overwrite=true` clears what a run writes there first."""
    run_dir = Path(run_dir)
    if holds_a_run(run_dir):
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds a run (results.json / checkpoints); continue it with "
                              "resume=true, start it over with overwrite=true, or pick another hydra.run.dir")
        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log.info(f"overwrite=true: cleared the previous run's outputs in {run_dir}")
    keep_hydra_record(run_dir)


def keep_hydra_record(run_dir: Path) -> None:
    """Copy this start's `.hydra/` to `.hydra_original/` (what `restore_hydra_record` puts back)."""
    source, target = Path(run_dir) / ".hydra", Path(run_dir) / HYDRA_RECORD
    if not source.is_dir():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


def restore_hydra_record(run_dir: Path) -> None:
    """A refused start (config differs, directory taken, bad input) must not leave its own config as the
    record of the run in that directory: Hydra wrote `.hydra/` before the run began; put the original back."""
    record, hydra_dir = Path(run_dir) / HYDRA_RECORD, Path(run_dir) / ".hydra"
    if not record.is_dir():
        return
    for path in record.iterdir():
        tmp = hydra_dir / (path.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(hydra_dir / path.name)
