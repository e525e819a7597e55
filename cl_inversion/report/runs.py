"""Finding runs (every results.json below the given directories), grouping them into rows of method × setting,
and one run's table numbers."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_inversion.loop.metrics import backward_transfer
from cl_inversion.loop.results import RunResults

PROG = "cl_inversion.report"
METRICS = {"final_accuracy": "Final acc. (%)", "average_incremental_accuracy": "Avg. inc. acc. (%)",
           "forgetting": "Forgetting (%)", "backward_transfer": "BWT (%)", "old_class_accuracy": "Old acc. (%)",
           "new_class_accuracy": "New acc. (%)", "task_aware_accuracy": "Task-aware acc. (%)",
           "synthesis_s": "Synth. s / boundary", "synthesis_passes": "Synth. passes / boundary"}
DIGITS = {"synthesis_passes": 1}  # decimals shown (default 2)
SYNTHESIS = ("synthesis_s", "synthesis_passes")  # "—" where the method does not synthesise
SETTING = {"dataset": "Dataset", "n_tasks": "Tasks", "first_task_classes": "First task", "backbone": "Backbone"}
# Config keys that never make two runs different experiments (seeds are averaged; logging/infra keys ignored).
IGNORED = ("seed", "resume", "checkpoint", "experiment_name", "logger", "scenario.class_order_seed",
           "scenario.class_order", "scenario.n_tasks", "scenario.first_task_classes", "dataset.root",
           "dataset.download", "dataset.num_workers", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
           "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.precision",
           "trainer.deterministic", "trainer.benchmark", "scheduler.T_max", "method._target_",
           "dataset._target_", "backbone._target_")


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _last_row_mean(matrix: Any) -> float | None:
    return _mean(matrix[-1]) if isinstance(matrix, list) and matrix and matrix[-1] else None


def _class_group_accuracy(results: RunResults, key: str) -> float | None:
    """Old-/new-class accuracy after the last task: as recorded (top level, else the last per_task entry),
    else from the last matrix row — new = the last task, old = the earlier tasks weighted by their classes."""
    if key in results.summary:
        return results.summary[key]
    per_task = results.per_task
    if per_task and getattr(per_task[-1], key) is not None:
        return getattr(per_task[-1], key)
    matrix = results.accuracy_matrix
    if not matrix:
        return None
    last = matrix[-1]
    if key == "new_class_accuracy":
        return last[-1]
    if len(last) < 2:
        return None
    sizes = [len(p.classes or []) for p in per_task[: len(last) - 1]]
    if len(sizes) != len(last) - 1 or not all(sizes):
        sizes = [1] * (len(last) - 1)  # task sizes unknown: equal weights
    return sum(n * a for n, a in zip(sizes, last)) / sum(sizes)


def run_metric(results: RunResults, key: str) -> float | None:
    """One table number of one run (None: not defined for it, e.g. BWT of a single task)."""
    matrix = results.accuracy_matrix
    if key == "backward_transfer":
        return backward_transfer(matrix) if len(matrix) > 1 else None  # undefined for a single task
    if key in ("old_class_accuracy", "new_class_accuracy"):
        return _class_group_accuracy(results, key)
    if key == "task_aware_accuracy":
        value = _last_row_mean(results.task_aware_matrix)
        return value if value is not None else results.summary.get(key)
    if key in SYNTHESIS:
        records = [r for r in results.extra.get("inversion") or [] if isinstance(r, dict)]
        return _mean(r.get("wall_s" if key == "synthesis_s" else "full_model_passes") for r in records)
    return results.summary.get(key)


@dataclass
class Run:
    path: Path
    results: RunResults

    @property
    def status(self) -> str:
        return str(self.results.status or "unknown")

    def setting(self) -> dict[str, Any]:
        r = self.results
        scenario = (r.config or {}).get("scenario") or {}
        return {"dataset": r.dataset, "n_tasks": r.n_tasks, "first_task_classes": scenario.get("first_task_classes"),
                "backbone": r.backbone}

    def seed_key(self) -> str:
        """What makes two runs of one row different samples: the seed (and the class order it drew)."""
        return json.dumps([self.results.seed, self.results.class_order])

    def progress(self) -> str:
        """Tasks completed out of the run's tasks ("2/5")."""
        n_tasks = self.results.n_tasks if self.results.n_tasks is not None else "?"
        return f"{self.results.tasks_completed}/{n_tasks}"

    def written_at(self) -> float:
        """When the run finished: its recorded end time if any, else results.json's modification time."""
        for key in ("end_time", "finished_at"):
            if isinstance(self.results.extra.get(key), (int, float)):
                return float(self.results.extra[key])
        try:
            return (self.path / "results.json").stat().st_mtime
        except OSError:
            return 0.0


@dataclass
class Row:
    method: str
    setting: dict[str, Any]
    variant: str
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.method + (f" ({self.variant})" if self.variant else "")

    def values(self, key: str) -> list[float]:
        return [v for v in (run_metric(r.results, key) for r in self.runs) if v is not None]

    def mean_std(self, key: str) -> tuple[float, float]:
        values = self.values(key)
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def published(self) -> dict[str, Any] | None:
        """The preset's published figure (config `published`, shared by the row's runs), if it states one."""
        block = (self.runs[0].results.config or {}).get("published") if self.runs else None
        return block if isinstance(block, dict) and block.get("final_accuracy") is not None else None


def find_runs(roots: Iterable[str | Path]) -> tuple[list[Run], list[Run]]:
    """Every results.json below `roots` (readable or not), plus Hydra job dirs that have none."""
    runs, missing = [], []
    for root in map(Path, roots):
        if not root.exists():
            raise SystemExit(f"{PROG}: error: {root} does not exist")
        found = [p for p in sorted(root.rglob("results.json")) if ".submitit" not in p.parts]
        if not found:
            raise SystemExit(f"{PROG}: error: no results.json under {root.resolve()}")
        for path in found:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                data = {"status": "unreadable", "error": f"{type(err).__name__}: {err}"}
            runs.append(Run(path.parent, RunResults.from_dict(data)))
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if ".submitit" not in job.parts and not (job / "results.json").exists():
                overrides = hydra_dir / "overrides.yaml"
                text = overrides.read_text() if overrides.exists() else ""
                method = re.search(r"method=([\w.-]+)", text)
                missing.append(Run(job, RunResults(
                    status="no results.json", method=method[1] if method else None,
                    error="job started but wrote no results.json (killed before run()?)")))
    return runs, missing


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: config}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def group_runs(runs: Sequence[Run]) -> list[Row]:
    """Completed runs → table rows (method × setting × variant), in a stable order."""
    by_base: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_base[(str(run.results.method), json.dumps(run.setting(), sort_keys=True))].append(run)
    rows = []
    for (method, _), members in by_base.items():
        setting = members[0].setting()
        flat = [{k: v for k, v in _flatten(r.results.config or {}).items() if not _ignored(k)} for r in members]
        keys = sorted(set().union(*flat))
        varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
        by_variant: dict[str, Row] = {}
        for run, f in zip(members, flat):
            variant = ", ".join(f"{k}={f.get(k)}" for k in varying)
            by_variant.setdefault(variant, Row(method, setting, variant)).runs.append(run)
        rows += by_variant.values()
    return sorted(rows, key=lambda r: (json.dumps(r.setting, sort_keys=True, default=str), r.method, r.variant))


def _row_name(row: Row) -> str:
    return f"{row.label} [{_setting_title(row.setting)}]"


def resolve_duplicates(rows: Sequence[Row], keep_newest: bool = False) -> list[tuple[Row, Run, list[Run]]]:
    """Runs of one row with the same seed are one experiment run twice: an error naming them all, or with
    `keep_newest` the last-written is kept (removed from `row.runs` otherwise); returns (row, kept, dropped)."""
    found = []
    for row in rows:
        by_seed: dict[str, list[Run]] = defaultdict(list)
        for run in row.runs:
            by_seed[run.seed_key()].append(run)
        for same in by_seed.values():
            if len(same) > 1:
                same = sorted(same, key=lambda r: (r.written_at(), str(r.path)))
                found.append((row, same[-1], same[:-1]))
    if found and not keep_newest:
        groups = "; ".join(f"{_row_name(row)} seed {kept.results.seed}: "
                           + ", ".join(str(r.path) for r in [*dropped, kept]) for row, kept, dropped in found)
        raise SystemExit(f"{PROG}: error: the same config and seed was run more than once (a seed counted twice "
                         f"makes a false mean ± std); remove all but one of each, or pass --keep-newest: {groups}")
    for row, _, dropped in found:
        row.runs = [r for r in row.runs if not any(r is d for d in dropped)]
    return found


def _setting_name(setting: dict[str, Any]) -> str:
    parts = {"dataset": "{}", "n_tasks": "{}tasks", "first_task_classes": "first{}", "backbone": "{}"}
    return "_".join(fmt.format(setting[k]) for k, fmt in parts.items() if setting.get(k) is not None)


def _setting_title(setting: dict[str, Any]) -> str:
    return " · ".join(f"{SETTING[k].lower()} {v}" if k in ("n_tasks", "first_task_classes") else str(v)
                      for k, v in setting.items() if v is not None)
