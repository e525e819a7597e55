"""Structured-config schema: typos and wrong types in the top-level keys fail at composition time.

Group contents (dataset/backbone/method/trainer/logger) are checked where they are built: their
`_target_` signatures reject unknown keys.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ScenarioConfig:
    n_tasks: int = 5
    first_task_classes: int | None = None
    class_order_seed: int | None = None  # null: use `seed`
    class_order: list[int] | None = None  # explicit order, overrides the seeded permutation
    shuffle_classes: bool = True  # false: the dataset's natural class order (VDFD's scripts: no --rand_split)
    holdout_classes: Any = 0  # count (last of the class order) or list of class ids no task trains


@dataclass
class PublishedConfig:
    """A preset's published figure: `report` prints it beside our mean ± std (and the difference)."""

    final_accuracy: float | None = None  # final average accuracy (%), task-agnostic
    std: float | None = None
    source: str = ""  # paper and table, e.g. "ABD (Smith et al., ICCV 2021), Table 1"


@dataclass
class RunConfig:
    dataset: Any = MISSING
    backbone: Any = MISSING
    method: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    optimizer: Any = MISSING
    scheduler: Any = None
    inversion: Any = None
    profile: str = "published"  # the budget profile (conf/profile/), recorded with the run
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start over in a run directory that holds a run (clears its outputs first)
    resume_fallback: bool = False  # on resume, skip a corrupted latest checkpoint (kept as .corrupt)
    callbacks: Any = field(default_factory=dict)  # name -> {_target_: ...}: Lightning callbacks of the run
    checkpoint: bool = True
    experiment_name: str | None = None
    threads: int | None = None  # torch intra-op threads; null: from the job's CPU allocation (utils.threads)
    published: PublishedConfig | None = None  # set by experiment presets that reproduce a table row


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
