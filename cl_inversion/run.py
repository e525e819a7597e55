"""The experiment: `run(cfg)` builds it from the config (`build.py`) and runs the task loop (`loop/`); the CLI
(`python -m cl_inversion`) and notebooks both call it:

    cfg = compose(["method=lwf"])                   # hydra.compose on the same conf/ tree
    results = run(cfg, run_dir="outputs/notebook")  # RunResults; results["final_accuracy"] reads results.json's keys
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig

from cl_inversion.build import (  # noqa: F401  (the public API: compose, and the builders notebooks use)
    CONFIG_DIR,
    LOADER_KEYS,
    build_callbacks,
    build_dataset,
    build_method,
    build_scenario,
    chosen_engine,
    compose,
)
from cl_inversion.loop.results import RunResults
from cl_inversion.loop.run_dir import failure_recorded, resolve_run_dir, restore_hydra_record
from cl_inversion.loop.task_loop import TaskLoop
from cl_inversion.utils.errors import ConfigError

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> RunResults:
    """Run one continual-learning experiment; returns (and writes) its results.

    The config is validated before anything is written; a run that fails leaves a results.json with
    `status: failed` (or `interrupted`) and the error, unless the directory already holds another run's.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_lightning()
    run_dir = resolve_run_dir(run_dir)
    with failure_recorded(run_dir / "results.json", cfg):
        try:
            return TaskLoop(cfg, run_dir).run()
        except ConfigError:
            restore_hydra_record(run_dir)  # a refused start leaves the directory's run recorded as it was
            raise


def quiet_lightning() -> None:
    """One line per event: Lightning's own console handler duplicates what the root (Hydra's) handler
    prints; its per-Trainer banners (devices, tips, "fit stopped") repeat every task; the start line of
    the task loop names the device instead. Two warnings that fire on every Trainer and say nothing here
    are dropped: a frozen teacher is in eval mode on purpose, and small tasks have few batches."""
    root = logging.getLogger()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        if root.handlers:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in (".*module\\(s\\) in eval mode.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)
