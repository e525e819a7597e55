"""`TaskLoop`: one experiment, task by task — a fresh `Trainer.fit`, the method's between-task hook, the loop's
`ContinualCallback` hooks (synthesis), evaluation on every task seen so far, the record and a checkpoint."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cl_inversion.build import (
    LOADER_KEYS,
    build_callbacks,
    build_dataset,
    build_logger,
    build_method,
    build_scenario,
    check_budget,
    check_scenario,
    chosen_engine,
)
from cl_inversion.loop.checkpoints import (
    checkpoint_state,
    config_diff,
    find_resume_checkpoint,
    load_resume_state,
    restore,
    rng_state,
    set_rng_state,
)
from cl_inversion.loop.hooks import ContinualCallback, FiniteLossGuard, TaskContext
from cl_inversion.loop.metrics import Evaluation, evaluate
from cl_inversion.loop.results import RunResults, TaskRecord
from cl_inversion.loop.run_dir import claim_run_dir, failure_fields, hydra_choices
from cl_inversion.methods.base import state_bytes
from cl_inversion.utils import logging_utils
from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.io import save_checkpoint, write_json
from cl_inversion.utils.provenance import now, provenance
from cl_inversion.utils.threads import set_job_threads
from cl_inversion.utils.validate import validate_config

log = logging.getLogger("cl_inversion")


def progress_bar(cfg: DictConfig) -> dict[str, bool]:
    """`trainer.enable_progress_bar: null`: a bar on a terminal, none in a log file (a bar floods it)."""
    if cfg.trainer.get("enable_progress_bar", True) is None:
        return {"enable_progress_bar": sys.stderr.isatty()}
    return {}


def task_seed(seed: int, task: int) -> int:
    """Every task starts from its own seed, so a resumed run replays the same randomness."""
    return seed * 1000 + task


class TaskLoop:
    """One experiment, step by step: `build` (dataset, scenario, method, callbacks), `restore` (a checkpoint,
    when resuming), then for every task `train_task` (hook `before_task`, fit, the method's `end_task`) → hook
    `between_tasks` → `evaluate` → hook `after_evaluation` → `record`."""

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
        self.callbacks = build_callbacks(cfg, self.method, self.scenario)
        self.hooks = [cb for cb in self.callbacks if isinstance(cb, ContinualCallback)]
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
        restore(self.method, state, self.callbacks, source=ckpt_path, is_last=state["task"] == len(self.scenario) - 1)
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
        if not at_boundary:  # at a resumed boundary the head, weights and method state are task t's after training
            method.begin_task(t, len(scenario.tasks[t].classes), datamodule, is_last=t == len(scenario) - 1)
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
        self.call_hooks("between_tasks", self.context(t, datamodule, device))
        evaluation = self.evaluate(t, datamodule, device)
        self.call_hooks("after_evaluation", self.context(t, datamodule, device))
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
        self.call_hooks("before_task", self.context(t, datamodule, device))
        began = time.perf_counter()
        trainer.fit(method, datamodule=datamodule)
        logging_utils.after_fit(self.logger)
        train_s = time.perf_counter() - began
        method.net.to(device)  # fit's teardown left the module on the CPU
        method.end_task(datamodule)
        synthesises = t < len(self.scenario) - 1 and any(cb.acts_between_tasks for cb in self.hooks)
        if synthesises and self.cfg.checkpoint and trainer.is_global_zero:
            # the task's training survives a crash or Ctrl-C during synthesis: resume starts there
            save_checkpoint(self.checkpoint_path(t),
                            {**checkpoint_state(method, t, self.results.to_dict(), self.callbacks), "stage": "trained",
                             "train_time_s": train_s, "rng": rng_state()})
        return train_s

    def context(self, t: int, datamodule: Any, device: torch.device) -> TaskContext:
        """What the loop's hooks see of task t (its real data included), and the teacher: the frozen model the
        method made at its `end_task` (or restored from the checkpoint), as it is when the hook is called."""
        bundle = self.bundle
        return TaskContext(t, self.run_dir, self.logger, datamodule, bundle.image_shape, bundle.pixel_range(),
                           bundle.mean, bundle.std, device, is_last=t == len(self.scenario) - 1,
                           teacher=self.method.previous, n_seen=self.method.n_seen)

    def call_hooks(self, hook: str, context: TaskContext) -> None:
        """One of the `ContinualCallback` hooks on every such callback, then their results into results.json."""
        for callback in self.hooks:
            getattr(callback, hook)(self.method, context)
            self.results.extra.update(callback.results())

    def evaluate(self, t: int, datamodule: Any, device: torch.device) -> Evaluation:
        """Accuracy on the test data of every task seen so far (one head over all seen classes)."""
        self.method.net.to(device)
        evaluation = evaluate(self.method.net, datamodule.test_dataloaders(),
                              [self.scenario.tasks[j].classes for j in range(t + 1)], device)
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
