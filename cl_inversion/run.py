"""The task loop: for each task a fresh Trainer.fit, then evaluation on every task seen so far.

`run(cfg)` is the whole experiment; the CLI (`python -m cl_inversion`) and notebooks both call it:

    with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra.compose("config", overrides=["method=lwf"])
    results = run(cfg, run_dir="outputs/notebook")
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cl_inversion import logging_utils
from cl_inversion.data.datasets import DatasetBundle
from cl_inversion.data.scenario import ClassIncrementalScenario
from cl_inversion.errors import ConfigError
from cl_inversion.io import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, write_json
from cl_inversion.methods.base import ContinualModule
from cl_inversion.metrics import evaluate, summary
from cl_inversion.models.head import IncrementalClassifier

log = logging.getLogger("cl_inversion")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
LOADER_KEYS = ("batch_size", "num_workers", "channels")  # dataset keys that are not the loader's args

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The experiment config as the CLI would build it (for notebooks and tests)."""
    from cl_inversion.config import register_configs

    register_configs()
    with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra.compose("config", overrides=overrides or [], return_hydra_config=False)


def build_dataset(cfg: DictConfig) -> DatasetBundle:
    args = {k: v for k, v in cfg.dataset.items() if k not in LOADER_KEYS}
    return instantiate(args)


def build_scenario(cfg: DictConfig, bundle: DatasetBundle) -> ClassIncrementalScenario:
    sc = cfg.scenario
    seed = cfg.seed if sc.class_order_seed is None else sc.class_order_seed
    return ClassIncrementalScenario(bundle, sc.n_tasks, sc.first_task_classes, seed, sc.class_order)


def build_method(cfg: DictConfig) -> ContinualModule:
    net = IncrementalClassifier(instantiate(cfg.backbone))
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(cfg.method, net=net, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    return logging_utils.build_logger(cfg, run_dir, hydra_choices())


def task_seed(seed: int, task: int) -> int:
    """Every task starts from its own seed, so a resumed run replays the same randomness."""
    return seed * 1000 + task


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("checkpoints/task_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("resume", "experiment_name"):
            keys.append(f"{prefix}{key}")
    return keys


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def hydra_choices() -> dict[str, str]:
    """The config-group options picked (method=..., dataset=...) when running under Hydra's main."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one continual-learning experiment; returns (and writes) the results dict."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = resolve_run_dir(run_dir)
    choices = hydra_choices()
    config = OmegaConf.to_container(cfg, resolve=True)

    results_path = run_dir / "results.json"
    logger = False
    try:
        L.seed_everything(cfg.seed, verbose=False)
        bundle = build_dataset(cfg)
        scenario = build_scenario(cfg, bundle)
        method = build_method(cfg)
        logger = build_logger(cfg, run_dir)
    except BaseException as err:  # a sweep must show this job as failed, not lose it
        if not results_path.exists():
            write_json(results_path, {"status": "failed", "tasks_completed": 0, "n_tasks": cfg.scenario.n_tasks,
                                      "error": f"{type(err).__name__}: {err}", "seed": cfg.seed, "config": config,
                                      **{k: choices.get(k) for k in ("method", "dataset", "backbone")}})
        logging_utils.finish(logger, "failed")
        raise

    results: dict[str, Any] = {
        "status": "running",
        "tasks_completed": 0,
        "accuracy_matrix": [],
        "task_aware_matrix": [],
        "per_task": [],
        "method": choices.get("method", type(method).__name__.lower()),
        "dataset": choices.get("dataset", bundle.name),
        "backbone": choices.get("backbone", type(method.net.backbone).__name__.lower()),
        "n_tasks": len(scenario),
        "class_order": scenario.class_order,
        "class_names": scenario.class_names,
        "seed": cfg.seed,
        "class_order_seed": scenario.class_order_seed,
        "config": config,
    }
    start = 0
    if cfg.resume or (requeued() and latest_checkpoint(run_dir) is not None):
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is None:
            raise ConfigError(f"resume=true but {run_dir / 'checkpoints'} holds no task_<t>.ckpt; set "
                              "hydra.run.dir to the directory of the run to continue, or drop resume=true")
        state = load_checkpoint(ckpt_path)
        diff = _config_diff(state["results"]["config"], config)
        if diff:
            raise ConfigError(f"resume=true but the config differs from the checkpoint's in: {', '.join(diff)}")
        restore(method, state)
        results = state["results"]
        start = state["task"] + 1
        log.info(f"resuming {run_dir} after task {state['task']} ({ckpt_path.name})")

    batch_size = cfg.dataset.batch_size
    try:
        for t in range(start, len(scenario)):
            L.seed_everything(task_seed(cfg.seed, t), verbose=False)
            task = scenario.tasks[t]
            datamodule = scenario.datamodule(t, batch_size, cfg.dataset.num_workers,
                                             cumulative=method.uses_all_data, seed=task_seed(cfg.seed, t))
            method.begin_task(t, len(task.classes), datamodule, is_last=t == len(scenario) - 1)
            if t > start:  # Lightning's per-Trainer device banner, once per run is enough
                logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
            trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, default_root_dir=str(run_dir),
                                             **cluster_plugins(cfg))
            began = time.perf_counter()
            trainer.fit(method, datamodule=datamodule)
            logging_utils.after_fit(logger)
            method.end_task(datamodule)
            train_s = time.perf_counter() - began

            device = trainer.strategy.root_device
            method.net.to(device)
            row = evaluate(method.net, datamodule.test_dataloaders(),
                           [scenario.tasks[j].classes for j in range(t + 1)], device)
            results["accuracy_matrix"].append(row.accuracy)
            results["task_aware_matrix"].append(row.task_aware)
            results["per_task"].append({
                "task": t, "classes": task.original_classes, "accuracy": row.accuracy,
                "average_accuracy": sum(row.accuracy) / len(row.accuracy),
                "old_class_accuracy": row.old_class_accuracy, "new_class_accuracy": row.new_class_accuracy,
                "train_time_s": train_s,
            })
            results.update(summary(results["accuracy_matrix"], results["task_aware_matrix"], row))
            results["tasks_completed"] = t + 1
            results["status"] = "completed" if t == len(scenario) - 1 else "running"
            if trainer.is_global_zero:
                logging_utils.log_task(logger, results, t)
                if cfg.checkpoint:
                    save_checkpoint(run_dir / "checkpoints" / f"task_{t}.ckpt", checkpoint_state(method, t, results))
                write_json(results_path, results)
            log.info(f"task {t + 1}/{len(scenario)} | classes {task.original_classes} | "
                     f"avg acc {results['per_task'][-1]['average_accuracy']:.2f} | "
                     f"new {row.new_class_accuracy:.2f} | old {_fmt(row.old_class_accuracy)} | {train_s:.1f}s")
    except BaseException as err:
        results["status"] = "failed"
        results["error"] = f"{type(err).__name__}: {err}"
        write_json(results_path, results)
        logging_utils.finish(logger, "failed")
        raise
    logging_utils.log_final(logger, results, run_dir)
    logging_utils.finish(logger, "success")
    log.info(f"final accuracy {results['final_accuracy']:.2f} | average incremental "
             f"{results['average_incremental_accuracy']:.2f} | forgetting {results['forgetting']:.2f} | "
             f"results: {results_path}")
    return results


def requeued() -> bool:
    """True in a SLURM job that was requeued (preemption/timeout): it continues from its last checkpoint."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def cluster_plugins(cfg: DictConfig) -> dict[str, Any]:
    """Under submitit on SLURM, submitit owns requeue: Lightning's SLURM environment must not requeue too."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or cfg.trainer.get("plugins"):
        return {}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


def summary_scalars(results: dict[str, Any]) -> dict[str, float]:
    keys = ("final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer",
            "old_class_accuracy", "new_class_accuracy", "task_aware_accuracy")
    return {f"summary/{k}": results[k] for k in keys if results.get(k) is not None}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def checkpoint_state(method: ContinualModule, task: int, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "task": task,
        "task_sizes": list(method.task_sizes),
        "net": method.net.state_dict(),
        "method": method.extra_state(),
        "results": results,
    }


def restore(method: ContinualModule, state: dict[str, Any]) -> None:
    """Put a method back in its state after `state['task']` (head rebuilt before loading weights)."""
    for size in state["task_sizes"]:
        method.net.head.grow(size)
    method.task_sizes = list(state["task_sizes"])
    method.task = state["task"]
    method.net.load_state_dict(state["net"])
    method.load_extra_state(state["method"])
