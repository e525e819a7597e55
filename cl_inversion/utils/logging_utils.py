"""Everything the task loop tells its logger (CSV, TensorBoard, W&B), in one place.

`loop/task_loop.py` calls `build_logger` once, `after_fit` after every `Trainer.fit`, `log_task` after every task's
evaluation and `finish` at the end of the job (also on failure). Scalars go through Lightning's
`Logger` API so every logger gets the same ones; W&B is special-cased only for what that API lacks:
the accuracy-matrix table, images and `run.summary`. `log_image` is the helper for other components
(e.g. synthetic-image grids from an inversion callback).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cl_inversion.loop.metrics import SUMMARY_KEYS
from cl_inversion.loop.results import RunResults


def _sweep_name() -> str | None:
    """Name of the Hydra sweep directory when this job is part of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().mode.name != "MULTIRUN":
        return None
    return Path(HydraConfig.get().sweep.dir).name


def _job_name(choices: dict[str, str], cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    base = f"{choices.get('method', 'run')}_{choices.get('dataset', '')}_s{cfg.seed}"
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        return f"{HydraConfig.get().job.num}_{base}"
    return base


def build_logger(cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None = None) -> Logger | bool:
    """Instantiate `cfg.logger` writing under `run_dir` (False for `logger=none`).

    W&B: group defaults to `experiment_name`, else the sweep directory's name (one group per sweep); tags
    get the method/dataset/backbone choices; run name is `<job num>_<method>_<dataset>_s<seed>`.
    """
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    choices = choices or {}
    extra: dict[str, Any] = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        tags = list(cfg.logger.get("tags") or [])
        tags += [f"{k}:{choices[k]}" for k in ("method", "dataset", "backbone") if k in choices]
        extra = {"group": cfg.logger.get("group") or cfg.get("experiment_name") or _sweep_name(),
                 "tags": list(dict.fromkeys(tags)),
                 "name": cfg.logger.get("name") or _job_name(choices, cfg)}
    logger = instantiate(cfg.logger, save_dir=str(run_dir), **extra)
    if isinstance(logger, CSVLogger):
        keep_csv_history(logger)
    config = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(logger, WandbLogger):  # nested, so W&B filters read `method.temperature`, not `method/temperature`
        logger.experiment.config.update(config, allow_val_change=True)
    else:
        logger.log_hyperparams(config)
    return logger


def keep_csv_history(logger: CSVLogger) -> None:
    """A resumed run appends to metrics.csv: Lightning's CSV writer deletes an existing file when it starts
    (`_ExperimentWriter._check_log_dir_exists`), which would lose the earlier tasks' curves."""
    path = Path(logger.log_dir) / "metrics.csv"
    history = path.read_bytes() if path.is_file() else None
    writer = logger.experiment  # created here: the writer removes the file
    if history is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(history)
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    writer.metrics_keys = sorted(set(header) | set(writer.metrics_keys))  # Lightning keeps them sorted


def after_fit(logger: Logger | bool) -> None:
    """Re-sync logger state that a `ddp_spawn` worker changed on disk.

    With `ddp_spawn`, fit runs in workers on a pickled copy of the logger; the CSV writer in this
    process then does not know the columns the workers added to metrics.csv and would fail rewriting
    its header. Take them from the file.
    """
    if isinstance(logger, CSVLogger):
        writer = logger.experiment
        path = Path(writer.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), [])
            writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


@rank_zero_only
def log_task(logger: Logger | bool, results: RunResults, task: int) -> None:
    """After task `task`'s evaluation: its accuracy row and average, old/new-class accuracy (step = task)."""
    if not logger:
        return
    last = results.per_task[-1]
    metrics = {f"eval/accuracy_task_{j}": a for j, a in enumerate(last.accuracy)}
    metrics["eval/average_accuracy"] = last.average_accuracy
    metrics["eval/new_class_accuracy"] = last.new_class_accuracy
    if last.old_class_accuracy is not None:
        metrics["eval/old_class_accuracy"] = last.old_class_accuracy
    logger.log_metrics(metrics, step=task)
    logger.save()


@rank_zero_only
def log_final(logger: Logger | bool, results: RunResults, run_dir: Path) -> None:
    """End of run: summary scalars everywhere; accuracy-matrix table, heatmap and run.summary on W&B."""
    if not logger:
        return
    scalars = {k: results.summary[k] for k in SUMMARY_KEYS if results.summary.get(k) is not None}
    logger.log_metrics({f"summary/{k}": v for k, v in scalars.items()}, step=len(results.accuracy_matrix))
    from cl_inversion.report.plots import accuracy_heatmap

    heatmap = accuracy_heatmap(results.accuracy_matrix, run_dir / "accuracy_matrix.png",
                               title=f"{results.method} on {results.dataset}")
    log_image(logger, "accuracy_matrix_heatmap", heatmap)
    if isinstance(logger, WandbLogger):
        import wandb

        matrix = results.accuracy_matrix
        n = len(matrix)
        columns = ["after_task"] + [f"task_{j}" for j in range(n)]
        rows = [[i] + [row[j] if j < len(row) else None for j in range(n)] for i, row in enumerate(matrix)]
        logger.experiment.log({"accuracy_matrix": wandb.Table(columns=columns, data=rows)})
        logger.experiment.summary.update(scalars | {"tasks_completed": results.tasks_completed,
                                                    "status": results.status})


def finish(logger: Logger | bool, status: str) -> None:
    """Close the job's logger; for W&B also `wandb.finish` so the next job in this process gets its own run."""
    if not logger:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            if status != "success":
                wandb.run.summary["status"] = "failed"
            wandb.finish(exit_code=0 if status == "success" else 1)


def _loggers(target: Any) -> list[Logger]:
    if target is None or target is False:
        return []
    if isinstance(target, Logger):
        return [target]
    if hasattr(target, "loggers"):  # a Trainer or a LightningModule attached to one
        return list(target.loggers)
    return list(target) if isinstance(target, Iterable) else []


@rank_zero_only
def log_image(target: Any, key: str, image: str | Path, step: int | None = None,
              caption: str | None = None) -> list[str]:
    """Log a PNG (e.g. a grid of synthetic images) to every logger that supports images.

    `target` is a Logger, a list of them, or a Trainer / LightningModule (`.loggers`). W&B gets a
    `wandb.Image`, TensorBoard `add_image`; CSV has no images (the PNG stays where it is). Returns the
    names of the loggers that took the image.
    """
    took = []
    for logger in _loggers(target):
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(image)], step=step,
                             **({"caption": [caption]} if caption else {}))
            took.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            array = np.asarray(Image.open(image).convert("RGB"))
            logger.experiment.add_image(key, array, global_step=step or 0, dataformats="HWC")
            took.append("tensorboard")
    return took

