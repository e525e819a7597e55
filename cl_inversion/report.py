"""`python -m cl_inversion.report <run or sweep dir>... [--out DIR]`: compare runs in a paper-style table.

Collects every results.json below the given directories. Completed runs are grouped into rows of
method × setting (dataset, tasks, first-task classes, backbone, and any other config value that differs
between runs of that method, shown in a `variant` column); each metric is mean ± std over seeds (sample
std, n−1). Failed, incomplete and unreadable runs — and Hydra job directories without a results.json —
are listed separately, never dropped. Writes report.md, report.csv (one row per table row, numeric),
runs.csv (one row per run), accuracy_curves*.png and one heatmap_*.png per row (mean matrix over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_inversion.plots import accuracy_curves, accuracy_heatmap

METRICS = {"final_accuracy": "Final acc. (%)", "average_incremental_accuracy": "Avg. inc. acc. (%)",
           "forgetting": "Forgetting (%)"}
SETTING = {"dataset": "Dataset", "n_tasks": "Tasks", "first_task_classes": "First task", "backbone": "Backbone"}
# Config keys that never make two runs different experiments (seeds are averaged; logging/infra keys ignored).
IGNORED = ("seed", "resume", "checkpoint", "experiment_name", "logger", "scenario.class_order_seed",
           "scenario.class_order", "scenario.n_tasks", "scenario.first_task_classes", "dataset.root",
           "dataset.download", "dataset.num_workers", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
           "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.precision",
           "trainer.deterministic", "trainer.benchmark", "scheduler.T_max", "method._target_",
           "dataset._target_", "backbone._target_")


@dataclass
class Run:
    path: Path
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.data.get("status", "unknown"))

    def setting(self) -> dict[str, Any]:
        scenario = (self.data.get("config") or {}).get("scenario") or {}
        return {"dataset": self.data.get("dataset"), "n_tasks": self.data.get("n_tasks"),
                "first_task_classes": scenario.get("first_task_classes"), "backbone": self.data.get("backbone")}


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
        return [r.data[key] for r in self.runs if r.data.get(key) is not None]

    def mean_std(self, key: str) -> tuple[float, float]:
        values = self.values(key)
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def find_runs(roots: Iterable[str | Path]) -> tuple[list[Run], list[Run]]:
    """Every results.json below `roots` (readable or not), plus Hydra job dirs that have none."""
    runs, missing = [], []
    for root in map(Path, roots):
        if not root.exists():
            raise SystemExit(f"cl_inversion.report: error: {root} does not exist")
        for path in sorted(root.rglob("results.json")):
            if ".submitit" in path.parts:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                data = {"status": "unreadable", "error": f"{type(err).__name__}: {err}"}
            runs.append(Run(path.parent, data))
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if ".submitit" not in job.parts and not (job / "results.json").exists():
                overrides = hydra_dir / "overrides.yaml"
                text = overrides.read_text() if overrides.exists() else ""
                method = re.search(r"method=([\w.-]+)", text)
                missing.append(Run(job, {"status": "no results.json", "method": method[1] if method else None,
                                         "error": "job started but wrote no results.json (killed before run()?)"}))
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
        by_base[(str(run.data.get("method")), json.dumps(run.setting(), sort_keys=True))].append(run)
    rows = []
    for (method, _), members in by_base.items():
        setting = members[0].setting()
        flat = [{k: v for k, v in _flatten(r.data.get("config") or {}).items() if not _ignored(k)} for r in members]
        keys = sorted(set().union(*flat))
        varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
        by_variant: dict[str, Row] = {}
        for run, f in zip(members, flat):
            variant = ", ".join(f"{k}={f.get(k)}" for k in varying)
            by_variant.setdefault(variant, Row(method, setting, variant)).runs.append(run)
        rows += by_variant.values()
    return sorted(rows, key=lambda r: (json.dumps(r.setting, sort_keys=True, default=str), r.method, r.variant))


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _setting_columns(rows: Sequence[Row]) -> list[str]:
    """Setting columns worth showing: drop first_task_classes when it is never set."""
    return [k for k in SETTING if k != "first_task_classes" or any(r.setting.get(k) is not None for r in rows)]


def markdown_table(rows: Sequence[Row], failed: Sequence[Run]) -> str:
    setting_keys = _setting_columns(rows)
    show_variant = any(r.variant for r in rows)
    header = ["Method"] + (["Variant"] if show_variant else []) + [SETTING[k] for k in setting_keys]
    header += list(METRICS.values()) + ["Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * (len(header) - len(METRICS) - 1)
                                                          + ["---:"] * (len(METRICS) + 1)) + "|"]
    for row in rows:
        cells = [row.method] + ([row.variant or "–"] if show_variant else [])
        cells += ["–" if row.setting.get(k) is None else str(row.setting[k]) for k in setting_keys]
        cells += [_fmt(*row.mean_std(key), len(row.values(key))) for key in METRICS]
        cells.append(str(len(row.runs)))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nMean ± sample std over seeds; final acc. = mean of the last row of the accuracy " \
                              "matrix, avg. inc. acc. = mean over tasks of the average accuracy after each task.\n"
    if failed:
        text += f"\n**Failed or incomplete runs ({len(failed)})** — not in the table above:\n\n"
        text += "| Run | Method | Status | Tasks done | Error |\n|---|---|---|---:|---|\n"
        for run in failed:
            done = f"{run.data.get('tasks_completed', 0)}/{run.data.get('n_tasks', '?')}"
            error = str(run.data.get("error", "")).replace("|", "\\|").replace("\n", " ")[:200]
            text += f"| {run.path} | {run.data.get('method') or '–'} | {run.status} | {done} | {error} |\n"
    return text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:120]


def _setting_name(setting: dict[str, Any]) -> str:
    parts = {"dataset": "{}", "n_tasks": "{}tasks", "first_task_classes": "first{}", "backbone": "{}"}
    return "_".join(fmt.format(setting[k]) for k, fmt in parts.items() if setting.get(k) is not None)


def _setting_title(setting: dict[str, Any]) -> str:
    return " · ".join(f"{SETTING[k].lower()} {v}" if k in ("n_tasks", "first_task_classes") else str(v)
                      for k, v in setting.items() if v is not None)


def _mean_matrix(matrices: Sequence[Sequence[Sequence[float]]]) -> tuple[list[list[float]], list[list[float]]]:
    shape = [len(row) for row in matrices[0]]
    same = [m for m in matrices if [len(row) for row in m] == shape]
    mean = [[statistics.fmean(m[i][j] for m in same) for j in range(n)] for i, n in enumerate(shape)]
    std = [[statistics.stdev([m[i][j] for m in same]) if len(same) > 1 else 0.0 for j in range(n)]
           for i, n in enumerate(shape)]
    return mean, std


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """One accuracy-curve plot per setting (a line per method/variant) and one heatmap per row."""
    written = []
    by_setting: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_setting[_setting_name(row.setting)].append(row)
    for name, members in by_setting.items():
        curves = {}
        for row in members:
            per_run = [[sum(r) / len(r) for r in run.data["accuracy_matrix"]] for run in row.runs]
            n = min(len(c) for c in per_run)
            mean = [statistics.fmean(c[i] for c in per_run) for i in range(n)]
            std = [statistics.stdev([c[i] for c in per_run]) if len(per_run) > 1 else 0.0 for i in range(n)]
            curves[f"{row.label} (n={len(row.runs)})"] = (mean, std)
        suffix = "" if len(by_setting) == 1 else f"_{_slug(name)}"
        title = _setting_title(members[0].setting)
        written.append(accuracy_curves(curves, out / f"accuracy_curves{suffix}.png", title=title))
        for row in members:
            mean, std = _mean_matrix([run.data["accuracy_matrix"] for run in row.runs])
            title = f"{row.label} — {_setting_title(row.setting)}\nmean over {len(row.runs)} seed(s)"
            path = out / f"heatmap_{_slug(row.label)}_{_slug(name)}.png"
            written.append(accuracy_heatmap(mean, path, title=title, std=std if len(row.runs) > 1 else None))
    return written


def write_csvs(rows: Sequence[Row], runs: Sequence[Run], out: Path) -> None:
    setting_keys = list(SETTING)
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "variant", *setting_keys, *[f"{k}_{s}" for k in METRICS for s in ("mean", "std")],
                         "n_seeds", "seeds"])
        for row in rows:
            stats = [v for key in METRICS for v in row.mean_std(key)]
            writer.writerow([row.method, row.variant, *[row.setting.get(k) for k in setting_keys], *stats,
                             len(row.runs), " ".join(str(r.data.get("seed")) for r in row.runs)])
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "status", "method", *setting_keys, "seed", "tasks_completed", *METRICS, "error"])
        for run in runs:
            setting = run.setting()
            writer.writerow([run.path, run.status, run.data.get("method"), *[setting.get(k) for k in setting_keys],
                             run.data.get("seed"), run.data.get("tasks_completed"),
                             *[run.data.get(k) for k in METRICS], run.data.get("error", "")])


def report(roots: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Build the report for the runs below `roots`; returns rows, failed runs, markdown and written paths."""
    runs, missing = find_runs(roots)
    completed = [r for r in runs if r.status == "completed" and r.data.get("accuracy_matrix")]
    failed = [r for r in runs if r not in completed] + missing
    rows = group_runs(completed)
    out = Path(out) if out is not None else Path(roots[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, failed)
    (out / "report.md").write_text(text)
    write_csvs(rows, runs + missing, out)
    plots = write_plots(rows, out)
    return {"rows": rows, "failed": failed, "markdown": text, "out": out, "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_inversion.report", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or sweep directories (searched recursively for results.json)")
    parser.add_argument("--out", help="output directory (default: <first dir>/report)")
    args = parser.parse_args(argv)
    result = report(args.dirs, args.out)
    print(result["markdown"])
    print(f"{len(result['rows'])} rows, {len(result['failed'])} failed/incomplete; written to {result['out']}: "
          f"report.md, report.csv, runs.csv, {len(result['plots'])} plots")
    return 1 if not result["rows"] and not result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
