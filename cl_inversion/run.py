"""The experiment: built from the config, then the task loop — for each task a fresh Trainer.fit, the
between-task step (synthesis), evaluation on every task seen so far, and the record of it.

`run(cfg)` is the whole experiment; the CLI (`python -m cl_inversion`) and notebooks both call it:

    cfg = compose(["method=lwf"])                   # hydra.compose on the same conf/ tree
    results = run(cfg, run_dir="outputs/notebook")  # RunResults; results["final_accuracy"] reads results.json's keys
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cl_inversion import logging_utils
from cl_inversion.data.datasets import DatasetBundle
from cl_inversion.data.scenario import ClassIncrementalScenario
from cl_inversion.entry import REPO_CONFIG_DIR, config_dir, engine_alias
from cl_inversion.errors import ConfigError, TrainingDiverged
from cl_inversion.hydra_context import hydra_choices, resolve_run_dir
from cl_inversion.inversion.callback import ContinualCallback, TaskContext
from cl_inversion.io import save_checkpoint, write_json
from cl_inversion.methods.base import ContinualModule, state_bytes
from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.metrics import Evaluation, evaluate
from cl_inversion.models.head import IncrementalClassifier
from cl_inversion.provenance import now, provenance
from cl_inversion.results import RunResults, TaskRecord
from cl_inversion.resume import (
    checkpoint_state,
    claim_run_dir,
    config_diff,
    failure_fields,
    failure_recorded,
    find_resume_checkpoint,
    load_resume_state,
    restore,
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
        return hydra.compose("config", overrides=engine_alias(overrides or []), return_hydra_config=False)


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


def engine_names() -> list[str]:
    """The synthesis engines of the config tree (conf/inversion/engine/<name>.yaml)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "inversion" / "engine").glob("*.yaml") if p.stem != "none")


def chosen_engine(cfg: DictConfig) -> tuple[str | None, DictConfig | None]:
    """The synthesis engine the config composed (`inversion/engine=<name>`, at `inversion.<name>`), or none.

    Settings of an engine the run does not use (`++inversion.pixel.steps=5` in a sweep that also runs ABD's
    generator) are dropped from the config, with a warning; a block that names no engine is refused."""
    inversion = cfg.get("inversion") or {}
    blocks = {k: v for k, v in inversion.items() if isinstance(v, DictConfig)}
    engines = [k for k, v in blocks.items() if "_target_" in v]
    unknown = sorted(set(blocks) - set(engine_names()))
    if unknown or len(engines) > 1:
        chosen = ", ".join(engines) or "none"
        raise ConfigError(f"inversion.{(unknown or engines)[0]}: not the run's engine ({chosen}); engines: "
                          f"{', '.join(engine_names())} (choose one with inversion/engine=<name>)")
    unused = sorted(set(blocks) - set(engines))
    if unused:
        log.warning(f"warning: inversion.{', inversion.'.join(unused)} ignored: the run's engine is "
                    f"{engines[0] if engines else 'none'}")
        with open_dict(cfg):
            for name in unused:
                del cfg.inversion[name]
    return (engines[0], blocks[engines[0]]) if engines else (None, None)


def build_inversion(cfg: DictConfig, method: ContinualModule) -> list[L.Callback]:
    """The inversion callback for a student that replays synthetic data, running the composed engine."""
    name, engine = chosen_engine(cfg)
    if not isinstance(method, InversionStudent):
        if engine is not None:
            raise ConfigError(f"{type(method).__name__} replays no synthetic images: inversion/engine={name} has no "
                              "use with it (leave inversion/engine=none)")
        return []
    if engine is None:
        raise ConfigError(f"{type(method).__name__} replays synthetic images but no engine is chosen: "
                          "inversion/engine=" + "|".join(engine_names()))
    n_images = cfg.inversion.n_images
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"inversion.n_images={n_images!r} must be an integer >= 1 (synthetic images made "
                          f"at each task boundary by engine {name})")
    per_task = cfg.inversion.get("n_images_per_task", 0)
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 0:
        raise ConfigError(f"inversion.n_images_per_task={per_task!r} must be an integer >= 0 (images added to the "
                          "boundary's synthetic set per task learned)")
    from cl_inversion.inversion import InversionCallback

    return [InversionCallback(instantiate(engine), n_images=cfg.inversion.n_images, grid=cfg.inversion.grid,
                              n_images_per_task=per_task)]


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """The run's logger (`logger=` group), or False."""
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


class TaskLoop:
    """One experiment, step by step: `build` (dataset, scenario, method, callbacks), `restore` (a checkpoint,
    when resuming), then for every task `train_task` → `between_tasks` → `evaluate` → `record`."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.results_path = self.run_dir / "results.json"
        self.boundary: dict[str, Any] | None = None  # a checkpoint taken between training and synthesis

    # --- build ---------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        validate_config(cfg, {"dataset": {k: int for k in LOADER_KEYS}})
        check_budget(cfg)
        if chosen_engine(cfg)[0] is None:  # no engine: the inversion settings have no use and are not recorded
            with open_dict(cfg):
                cfg.pop("inversion", None)
        self.threads, self.threads_source = set_job_threads(cfg.get("threads"))
        self.config = OmegaConf.to_container(cfg, resolve=True)
        L.seed_everything(cfg.seed, verbose=False)
        self.bundle = build_dataset(cfg)
        self.scenario = build_scenario(cfg, self.bundle)
        check_scenario(self.scenario, self.bundle)
        self.method = build_method(cfg)
        self.callbacks = build_callbacks(cfg, self.method)
        choices, method, scenario = hydra_choices(), self.method, self.scenario
        self.results = RunResults(
            method=choices.get("method", type(method).__name__.lower()),
            dataset=choices.get("dataset", self.bundle.name),
            backbone=choices.get("backbone", type(method.net.backbone).__name__.lower()),
            n_tasks=len(scenario), class_order=scenario.class_order, class_names=scenario.class_names,
            seed=cfg.seed, class_order_seed=scenario.class_order_seed, threads=self.threads, config=self.config)

    def restore(self, checkpoint: Path) -> int:
        """Put the method, callbacks and results back as checkpointed; returns the task to continue with."""
        state, ckpt_path = load_resume_state(checkpoint, self.cfg.get("resume_fallback", False))
        diff = config_diff(state["results"]["config"], self.config)
        if diff:
            raise ConfigError(f"cannot resume {ckpt_path}: the config differs from the checkpoint's in: "
                              f"{', '.join(diff)}")
        restore(self.method, state, self.callbacks, source=ckpt_path)
        self.results = RunResults.from_dict(state["results"])
        self.results.threads = self.threads
        trained = state.get("stage") == "trained"  # killed between training and synthesis: keep the training
        self.boundary = state if trained else None
        where = f"the training of task {state['task']} (synthesis next)" if trained else f"task {state['task']}"
        log.info(f"resuming {self.run_dir} after {where} ({ckpt_path.name})")
        return state["task"] if trained else state["task"] + 1

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> RunResults:
        self.build()
        checkpoint = find_resume_checkpoint(self.run_dir, self.cfg.resume)
        if checkpoint is not None:
            start = self.restore(checkpoint)
        else:
            start = 0
            claim_run_dir(self.run_dir, self.cfg.get("overwrite", False))
        self.logger = build_logger(self.cfg, self.run_dir)
        try:
            for t in range(start, len(self.scenario)):
                self.task(t, first=t == start, resumed=bool(start))
        except BaseException as err:
            if self.results.tasks_completed > 0 or not self.results_path.exists():  # never overwrite another run's
                failure = failure_fields(err)
                self.results.status, self.results.error = failure["status"], failure["error"]
                write_json(self.results_path, self.results.to_dict())
            logging_utils.finish(self.logger, "failed")
            raise
        logging_utils.log_final(self.logger, self.results, self.run_dir)
        logging_utils.finish(self.logger, "success")
        s = self.results.summary
        log.info(f"final accuracy {s['final_accuracy']:.2f} | average incremental "
                 f"{s['average_incremental_accuracy']:.2f} | forgetting {s['forgetting']:.2f} | "
                 f"results: {self.results_path}")
        return self.results

    def task(self, t: int, first: bool, resumed: bool) -> None:
        """Task t from start to record (a resumed boundary skips the training it already has)."""
        cfg, scenario, method = self.cfg, self.scenario, self.method
        L.seed_everything(task_seed(cfg.seed, t), verbose=False)
        datamodule = scenario.datamodule(t, cfg.dataset.batch_size, cfg.dataset.num_workers,
                                         cumulative=method.uses_all_data, seed=task_seed(cfg.seed, t))
        at_boundary = self.boundary is not None and first
        is_last = t == len(scenario) - 1
        if at_boundary:  # the head, weights and method state are task t's after training
            method.is_last_task = is_last
        else:
            method.begin_task(t, len(scenario.tasks[t].classes), datamodule, is_last=is_last)
        trainer: L.Trainer = instantiate(cfg.trainer, logger=self.logger, default_root_dir=str(self.run_dir),
                                         callbacks=[*self.callbacks, FiniteLossGuard(t, len(scenario))],
                                         **cluster_plugins(cfg), **progress_bar(cfg))
        device = trainer.strategy.root_device
        if first:
            self.announce(device, resumed)
        if self.results.provenance is None:
            self.results.provenance = provenance(str(device))
        began = time.perf_counter()
        if at_boundary:
            train_s = self.boundary["train_time_s"]
            set_rng_state(self.boundary["rng"])
            method.net.to(device)
        else:
            train_s = self.train_task(t, trainer, datamodule, device)
        self.between_tasks(t, datamodule, device)
        evaluation = self.evaluate(t, datamodule, device)
        self.record(t, trainer, evaluation, train_s, time.perf_counter() - began)

    def announce(self, device: torch.device, resumed: bool) -> None:
        r = self.results
        log.info(f"{'resuming' if resumed else 'starting'} {r.method} on {r.dataset} ({r.backbone}), profile "
                 f"{self.cfg.get('profile', 'published')}, seed "
                 f"{self.cfg.seed}, {len(self.scenario)} tasks, {device}, {self.threads} threads "
                 f"({self.threads_source}) | {self.run_dir}")

    def train_task(self, t: int, trainer: L.Trainer, datamodule: Any, device: torch.device) -> float:
        """`Trainer.fit` on task t, the method's between-task hook, and a checkpoint before synthesis."""
        method = self.method
        if t == 0:  # zero-shot retention baseline (CLIP backbones only; no-op otherwise)
            record_zero_shot(self.results.extra, method.net.backbone, self.scenario, self.cfg.dataset.batch_size,
                             device)
        began = time.perf_counter()
        trainer.fit(method, datamodule=datamodule)
        logging_utils.after_fit(self.logger)
        train_s = time.perf_counter() - began
        method.net.to(device)  # fit's teardown left the module on the CPU
        method.end_task(datamodule)
        synthesises = t < len(self.scenario) - 1 and any(isinstance(cb, ContinualCallback) for cb in self.callbacks)
        if synthesises and self.cfg.checkpoint and trainer.is_global_zero:
            # the task's training survives a crash or Ctrl-C during synthesis: resume starts there
            save_checkpoint(self.checkpoint_path(t),
                            {**checkpoint_state(method, t, self.results.to_dict(), self.callbacks), "stage": "trained",
                             "train_time_s": train_s, "rng": rng_state()})
        return train_s

    def between_tasks(self, t: int, datamodule: Any, device: torch.device) -> None:
        """The continual callbacks' step (synthesis for inversion methods), with the task's real data."""
        bundle = self.bundle
        context = TaskContext(t, self.run_dir, self.logger, datamodule, bundle.image_shape, bundle.pixel_range(),
                              bundle.mean, bundle.std, device)
        for callback in self.callbacks:
            if isinstance(callback, ContinualCallback):
                callback.on_task_end(self.method, context)
                self.results.extra.update(callback.results())

    def evaluate(self, t: int, datamodule: Any, device: torch.device) -> Evaluation:
        """Accuracy on the test data of every task seen so far (one head over all seen classes)."""
        self.method.net.to(device)
        evaluation = evaluate(self.method.net, datamodule.test_dataloaders(),
                              [self.scenario.tasks[j].classes for j in range(t + 1)], device)
        record_zero_shot(self.results.extra, self.method.net.backbone, self.scenario, self.cfg.dataset.batch_size,
                         device)
        return evaluation

    def record(self, t: int, trainer: L.Trainer, evaluation: Evaluation, train_s: float, wall_s: float) -> None:
        """Row t of the matrices into the results, the loggers, the task's checkpoint and results.json."""
        task, results = self.scenario.tasks[t], self.results
        results.add_task(TaskRecord(task=t, classes=task.original_classes, accuracy=evaluation.accuracy,
                                    average_accuracy=sum(evaluation.accuracy) / len(evaluation.accuracy),
                                    old_class_accuracy=evaluation.old_class_accuracy,
                                    new_class_accuracy=evaluation.new_class_accuracy, train_time_s=train_s,
                                    wall_s=wall_s),
                         evaluation, last=t == len(self.scenario) - 1)
        results.provenance["ended_at"] = now()
        results.carried_state_bytes = self.method.carried_state_bytes() + sum(
            state_bytes(cb.state_dict()) for cb in self.callbacks if hasattr(cb, "state_dict"))
        if trainer.is_global_zero:
            logging_utils.log_task(self.logger, results, t)
            if self.cfg.checkpoint:
                save_checkpoint(self.checkpoint_path(t),
                                checkpoint_state(self.method, t, results.to_dict(), self.callbacks))
            write_json(self.results_path, results.to_dict())
        log.info(f"task {t + 1}/{len(self.scenario)} | classes {task.original_classes} | "
                 f"avg acc {results.per_task[-1].average_accuracy:.2f} | new {evaluation.new_class_accuracy:.2f} | "
                 f"old {_fmt(evaluation.old_class_accuracy)} | {train_s:.1f}s")

    def checkpoint_path(self, t: int) -> Path:
        return self.run_dir / "checkpoints" / f"task_{t}.ckpt"


def cluster_plugins(cfg: DictConfig) -> dict[str, Any]:
    """Under submitit on SLURM, submitit owns requeue: Lightning's SLURM environment must not requeue too."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or cfg.trainer.get("plugins"):
        return {}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
