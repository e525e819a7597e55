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
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cl_inversion import logging_utils
from cl_inversion.data.datasets import DatasetBundle
from cl_inversion.data.scenario import ClassIncrementalScenario
from cl_inversion.entry import REPO_CONFIG_DIR, config_dir
from cl_inversion.errors import ConfigError, TrainingDiverged
from cl_inversion.inversion.callback import ContinualCallback, TaskContext
from cl_inversion.io import CHECKPOINT_FORMAT, save_checkpoint, write_json
from cl_inversion.methods.base import ContinualModule, state_bytes
from cl_inversion.metrics import evaluate, summary
from cl_inversion.models.head import IncrementalClassifier
from cl_inversion.provenance import now, provenance
from cl_inversion.resume import (
    callback_states,
    claim_run_dir,
    failure_fields,
    failure_recorded,
    find_resume_checkpoint,
    latest_checkpoint,  # noqa: F401  (re-exported: run.latest_checkpoint)
    load_callback_states,
    load_resume_state,
    restore_hydra_record,
    rng_state,
    set_rng_state,
)
from cl_inversion.threads import set_job_threads
from cl_inversion.validate import validate_config
from cl_inversion.zero_shot import record_zero_shot

log = logging.getLogger("cl_inversion")
CONFIG_DIR = config_dir() or REPO_CONFIG_DIR  # the checkout's conf/, else a wheel's installed copy
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
    if not sc.get("shuffle_classes", True):
        seed = None  # class_order_for: no shuffle
    return ClassIncrementalScenario(bundle, sc.n_tasks, sc.first_task_classes, seed, sc.class_order,
                                    sc.get("holdout_classes") or 0)


def build_method(cfg: DictConfig) -> ContinualModule:
    net = IncrementalClassifier(instantiate(cfg.backbone))
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(cfg.method, net=net, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)


def build_inversion(cfg: DictConfig, method: ContinualModule) -> list[L.Callback]:
    """The inversion callback when the method names a synthesis engine (`method.inversion`)."""
    name = method.inversion
    if not name:
        return []
    engines = {k: v for k, v in cfg.inversion.items() if isinstance(v, DictConfig) and "_target_" in v}
    if name not in engines:
        raise ConfigError(f"method.inversion={name!r} is not a synthesis engine; choose one of {sorted(engines)}")
    n_images = cfg.inversion.n_images
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"inversion.n_images={n_images!r} must be an integer >= 1 (synthetic images made "
                          f"at each task boundary for method.inversion={name})")
    from cl_inversion.inversion import InversionCallback

    return [InversionCallback(instantiate(engines[name]), n_images=cfg.inversion.n_images, grid=cfg.inversion.grid)]


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    return logging_utils.build_logger(cfg, run_dir, hydra_choices())


def build_callbacks(cfg: DictConfig, method: ContinualModule) -> list[Any]:
    """The run's Lightning callbacks (`callbacks.<name>: {_target_: ...}`, plus the inversion callback
    when the method names a synthesis engine), kept for the whole run and passed to every task's
    Trainer; their state is checkpointed (see `resume.callback_states`)."""
    callbacks = build_inversion(cfg, method)
    for name, node in (cfg.get("callbacks") or {}).items():
        callback = instantiate(node)
        if not isinstance(callback, L.Callback):
            raise ConfigError(f"callbacks.{name} builds a {type(callback).__name__}, not a lightning Callback")
        callbacks.append(callback)
    return callbacks


class FiniteLossGuard(L.Callback):
    """Stops the run at the first NaN or infinite training loss, naming task, epoch and step (a diverged
    run would otherwise train on and end `completed` with chance accuracy)."""

    def __init__(self, task: int, n_tasks: int) -> None:
        self.task, self.n_tasks = task, n_tasks

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDiverged(
                f"training loss is {loss.detach().float().sum().item()} at task {self.task + 1}/{self.n_tasks}, "
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, step {batch_idx} of the epoch "
                f"(global step {trainer.global_step}); lower optimizer.lr or check the data and the method's "
                "loss weights")


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


def progress_bar(cfg: DictConfig) -> dict[str, bool]:
    """`trainer.enable_progress_bar: null`: a bar on a terminal, none in a log file (a bar floods it)."""
    if cfg.trainer.get("enable_progress_bar", True) is None:
        import sys

        return {"enable_progress_bar": sys.stderr.isatty()}
    return {}


def check_budget(cfg: DictConfig) -> None:
    """Values Lightning accepts but that make no experiment: -1 epochs trains forever, 0 trains nothing."""
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
        raise ConfigError(f"trainer.max_epochs={max_epochs!r} must be an integer >= 1 (epochs per task; Lightning "
                          "reads -1 as 'train forever' and 0 trains nothing)")


def check_scenario(scenario: ClassIncrementalScenario, bundle: DatasetBundle) -> None:
    """A sequence that cannot measure continual learning: one class is refused, one task is warned about."""
    trained = sum(len(task.classes) for task in scenario.tasks)
    if trained < 2:
        held = len(scenario.holdout_classes)
        raise ConfigError(f"only {trained} class is trained (dataset {bundle.name!r} has {trained + held} classes, "
                          f"{held} held out by scenario.holdout_classes): accuracy would be a trivial 100%; "
                          "train at least 2 classes")
    if len(scenario) == 1:
        log.warning("warning: scenario.n_tasks=1: a single task is plain supervised training; nothing is "
                    "learnt incrementally, so forgetting, backward transfer and old-class accuracy say nothing "
                    "and the method's continual-learning losses never run")


def task_seed(seed: int, task: int) -> int:
    """Every task starts from its own seed, so a resumed run replays the same randomness."""
    return seed * 1000 + task


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("resume", "resume_fallback", "experiment_name", "overwrite"):
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
    """Run one continual-learning experiment; returns (and writes) the results dict.

    The config is validated before anything is written; a run that fails leaves a results.json with
    `status: failed` (or `interrupted`) and the error, unless the directory already holds another run's.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_lightning()
    run_dir = resolve_run_dir(run_dir)
    with failure_recorded(run_dir / "results.json", cfg):
        try:
            return _run(cfg, run_dir)
        except ConfigError:
            restore_hydra_record(run_dir)  # a refused start leaves the directory's run recorded as it was
            raise


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    choices = hydra_choices()
    validate_config(cfg, {"dataset": {k: int for k in LOADER_KEYS}})
    check_budget(cfg)
    threads, threads_source = set_job_threads(cfg.get("threads"))
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_from = find_resume_checkpoint(run_dir, cfg.resume)

    L.seed_everything(cfg.seed, verbose=False)
    bundle = build_dataset(cfg)
    scenario = build_scenario(cfg, bundle)
    check_scenario(scenario, bundle)
    method = build_method(cfg)
    callbacks = build_callbacks(cfg, method)

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
        "threads": threads,
        "provenance": None,  # filled in once the device is known (first Trainer)
        "config": config,
    }
    start = 0
    if resume_from is not None:
        state, ckpt_path = load_resume_state(resume_from, cfg.get("resume_fallback", False))
        diff = _config_diff(state["results"]["config"], config)
        if diff:
            raise ConfigError(f"cannot resume {ckpt_path}: the config differs from the checkpoint's in: "
                              f"{', '.join(diff)}")
        restore(method, state, callbacks, source=ckpt_path)
        results = state["results"]
        trained = state.get("stage") == "trained"  # killed between training and synthesis: keep the training
        start = state["task"] if trained else state["task"] + 1
        boundary = state if trained else None
        results["threads"] = threads
        where = f"the training of task {state['task']} (synthesis next)" if trained else f"task {state['task']}"
        log.info(f"resuming {run_dir} after {where} ({ckpt_path.name})")
    else:
        boundary = None
        claim_run_dir(run_dir, cfg.get("overwrite", False))
    logger = build_logger(cfg, run_dir)

    results_path = run_dir / "results.json"
    batch_size = cfg.dataset.batch_size
    try:
        for t in range(start, len(scenario)):
            L.seed_everything(task_seed(cfg.seed, t), verbose=False)
            task = scenario.tasks[t]
            datamodule = scenario.datamodule(t, batch_size, cfg.dataset.num_workers,
                                             cumulative=method.uses_all_data, seed=task_seed(cfg.seed, t))
            resumed_trained = boundary is not None and t == start
            if resumed_trained:  # the head, weights and method state are task t's after training
                method.is_last_task = t == len(scenario) - 1
            else:
                method.begin_task(t, len(task.classes), datamodule, is_last=t == len(scenario) - 1)
            trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, default_root_dir=str(run_dir),
                                             callbacks=[*callbacks, FiniteLossGuard(t, len(scenario))],
                                             **cluster_plugins(cfg), **progress_bar(cfg))
            device = trainer.strategy.root_device
            if t == start:
                log.info(f"{'resuming' if start else 'starting'} {results['method']} on {results['dataset']} "
                         f"({results['backbone']}), seed {cfg.seed}, {len(scenario)} tasks, {device}, "
                         f"{threads} threads ({threads_source}) | {run_dir}")
            if results.get("provenance") is None:
                results["provenance"] = provenance(str(device))
            task_began = time.perf_counter()
            if resumed_trained:
                train_s = boundary["train_time_s"]
                set_rng_state(boundary["rng"])
                method.net.to(device)
            else:
                if t == 0:  # zero-shot retention baseline (CLIP backbones only; no-op otherwise)
                    record_zero_shot(results, method.net.backbone, scenario, batch_size, device)
                began = time.perf_counter()
                trainer.fit(method, datamodule=datamodule)
                logging_utils.after_fit(logger)
                train_s = time.perf_counter() - began
                method.net.to(device)  # fit's teardown left the module on the CPU
                method.end_task(datamodule)
                synthesises = t < len(scenario) - 1 and any(isinstance(cb, ContinualCallback) for cb in callbacks)
                if synthesises and cfg.checkpoint and trainer.is_global_zero:
                    # the task's training survives a crash or Ctrl-C during synthesis: resume starts there
                    save_checkpoint(run_dir / "checkpoints" / f"task_{t}.ckpt",
                                    {**checkpoint_state(method, t, results, callbacks), "stage": "trained",
                                     "train_time_s": train_s, "rng": rng_state()})
            context = TaskContext(t, run_dir, logger, datamodule, bundle.image_shape, bundle.pixel_range(),
                                  bundle.mean, bundle.std, device)
            for callback in callbacks:
                if isinstance(callback, ContinualCallback):
                    callback.on_task_end(method, context)
                    results.update(callback.results())

            method.net.to(device)
            row = evaluate(method.net, datamodule.test_dataloaders(),
                           [scenario.tasks[j].classes for j in range(t + 1)], device)
            record_zero_shot(results, method.net.backbone, scenario, batch_size, device)
            results["accuracy_matrix"].append(row.accuracy)
            results["task_aware_matrix"].append(row.task_aware)
            results["per_task"].append({
                "task": t, "classes": task.original_classes, "accuracy": row.accuracy,
                "average_accuracy": sum(row.accuracy) / len(row.accuracy),
                "old_class_accuracy": row.old_class_accuracy, "new_class_accuracy": row.new_class_accuracy,
                "train_time_s": train_s,
                "wall_s": time.perf_counter() - task_began,  # training, synthesis and evaluation
            })
            results["wall_s"] = results.get("wall_s", 0.0) + results["per_task"][-1]["wall_s"]
            results["provenance"]["ended_at"] = now()
            results.update(summary(results["accuracy_matrix"], results["task_aware_matrix"], row))
            results["carried_state_bytes"] = method.carried_state_bytes() + sum(
                state_bytes(cb.state_dict()) for cb in callbacks if hasattr(cb, "state_dict"))
            results["tasks_completed"] = t + 1
            results["status"] = "completed" if t == len(scenario) - 1 else "running"
            if trainer.is_global_zero:
                logging_utils.log_task(logger, results, t)
                if cfg.checkpoint:
                    save_checkpoint(run_dir / "checkpoints" / f"task_{t}.ckpt",
                                    checkpoint_state(method, t, results, callbacks))
                write_json(results_path, results)
            log.info(f"task {t + 1}/{len(scenario)} | classes {task.original_classes} | "
                     f"avg acc {results['per_task'][-1]['average_accuracy']:.2f} | "
                     f"new {row.new_class_accuracy:.2f} | old {_fmt(row.old_class_accuracy)} | {train_s:.1f}s")
    except BaseException as err:
        if results["tasks_completed"] > 0 or not results_path.exists():  # never overwrite another run's
            results.update(failure_fields(err))
            write_json(results_path, results)
        logging_utils.finish(logger, "failed")
        raise
    logging_utils.log_final(logger, results, run_dir)
    logging_utils.finish(logger, "success")
    log.info(f"final accuracy {results['final_accuracy']:.2f} | average incremental "
             f"{results['average_incremental_accuracy']:.2f} | forgetting {results['forgetting']:.2f} | "
             f"results: {results_path}")
    return results


def cluster_plugins(cfg: DictConfig) -> dict[str, Any]:
    """Under submitit on SLURM, submitit owns requeue: Lightning's SLURM environment must not requeue too."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or cfg.trainer.get("plugins"):
        return {}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def checkpoint_state(method: ContinualModule, task: int, results: dict[str, Any],
                     callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Everything a resumed run needs after `task`: weights, head sizes, method and callback state."""
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
            source: Path | str = "checkpoint") -> None:
    """Put a method (and the run's callbacks) back in their state after `state['task']`; the head is
    rebuilt before loading weights."""
    for size in state["task_sizes"]:
        method.net.head.grow(size)
    method.task_sizes = list(state["task_sizes"])
    method.task = state["task"]
    method.net.load_state_dict(state["net"])
    method.restore_state(state["method"])
    load_callback_states(callbacks or [], state.get("callbacks", {}), source)
    for cb in callbacks or []:
        if isinstance(cb, ContinualCallback):
            cb.on_restore(method)
