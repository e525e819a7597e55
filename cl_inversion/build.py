"""From the config to the objects of a run: the composed config (`compose`), the dataset and its class-incremental
scenario, the method, the synthesis engine's callback and the run's other callbacks, the logger — and the checks
that refuse a config which would run but measure nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from cl_inversion.cli.entry import REPO_CONFIG_DIR, config_dir, engine_alias
from cl_inversion.data.datasets import DatasetBundle
from cl_inversion.data.scenario import ClassIncrementalScenario
from cl_inversion.loop.run_dir import hydra_choices
from cl_inversion.loop.zero_shot import ZeroShotRetention, embeds_text
from cl_inversion.methods.base import ContinualModule
from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.models.head import IncrementalClassifier
from cl_inversion.utils import logging_utils
from cl_inversion.utils.errors import ConfigError

log = logging.getLogger("cl_inversion")
CONFIG_DIR = config_dir() or REPO_CONFIG_DIR  # the checkout's conf/, else a wheel's installed copy
LOADER_KEYS = ("batch_size", "num_workers", "channels")  # dataset keys that are not the loader's args


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The experiment config as the CLI would build it (for notebooks and tests)."""
    from cl_inversion.utils.config import register_configs

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

    built = instantiate(engine)
    if getattr(built, "cuda_graph", None) is True and not runs_on_cuda(cfg):
        raise ConfigError(f"inversion.{name}.cuda_graph=true needs a CUDA device (trainer.accelerator="
                          f"{cfg.trainer.get('accelerator', 'auto')}, CUDA available: {torch.cuda.is_available()}): "
                          "set it to false or auto")
    return [InversionCallback(built, n_images=cfg.inversion.n_images, grid=cfg.inversion.grid,
                              n_images_per_task=per_task)]


def runs_on_cuda(cfg: DictConfig) -> bool:
    """Whether the run's Trainer will place the model on a CUDA device (`trainer.accelerator`)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto")


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """The run's logger (`logger=` group), or False."""
    return logging_utils.build_logger(cfg, run_dir, hydra_choices())


def build_callbacks(cfg: DictConfig, method: ContinualModule,
                    scenario: ClassIncrementalScenario | None = None) -> list[Any]:
    """The run's Lightning callbacks (`callbacks.<name>: {_target_: ...}`, plus the inversion callback
    when the method names a synthesis engine and CLIP's zero-shot retention for a backbone with a text tower),
    kept for the whole run and passed to every task's Trainer; their state is checkpointed
    (`loop.checkpoints.callback_states`)."""
    callbacks = build_inversion(cfg, method)
    if scenario is not None and embeds_text(method.net.backbone):
        callbacks.append(ZeroShotRetention(scenario, cfg.dataset.batch_size))
    for name, node in (cfg.get("callbacks") or {}).items():
        callback = instantiate(node)
        if not isinstance(callback, L.Callback):
            raise ConfigError(f"callbacks.{name} builds a {type(callback).__name__}, not a lightning Callback")
        callbacks.append(callback)
    return callbacks


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
