"""`python -m cl_inversion.report <run or sweep dir>... [--out DIR] [--format latex] [--keep-newest]`: compare
runs in a paper-style table.

Collects every results.json below the given directories (a directory with none is an error). Completed
runs are grouped into rows of method × setting (dataset, tasks, first-task classes, backbone, and any other
config value that differs between runs of that method, shown in a `variant` column); each metric is
mean ± std over seeds (sample std, n−1; a single seed shows the mean alone). Two completed runs of one row
with the same seed (and class order) are the same experiment twice, not two seeds: that is an error naming
both directories, unless `--keep-newest` keeps the one whose results.json was written last.

Columns: final accuracy, average incremental accuracy, forgetting, backward transfer (mean over old tasks j
of A[T-1][j] − A[j][j]), old- and new-class accuracy after the last task, task-aware accuracy (last row of
task_aware_matrix), the preset's published figure and our difference to it (when a run's config has a
`published` block), and the synthesis cost per task boundary (wall seconds and full-model passes from
results.json `inversion`; "—" for methods that do not synthesise).

Failed, incomplete and unreadable runs — and Hydra job directories without a results.json — are listed
separately, never dropped. Writes report.md, report.tex (booktabs tabular; printed instead of the markdown
with `--format latex`), report.csv (one row per table row, numeric), runs.csv (one row per run),
accuracy_curves*.png and one heatmap_*.png per row (mean matrix over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_inversion.loop.metrics import backward_transfer
from cl_inversion.loop.results import RunResults
from cl_inversion.plots import accuracy_curves, accuracy_heatmap

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


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _setting_columns(rows: Sequence[Row]) -> list[str]:
    """Setting columns worth showing: drop first_task_classes when it is never set."""
    return [k for k in SETTING if k != "first_task_classes" or any(r.setting.get(k) is not None for r in rows)]


def _metric_cell(row: Row, key: str) -> str:
    values = row.values(key)
    if key in SYNTHESIS and not values:
        return "—"
    return _fmt(*row.mean_std(key), len(values), DIGITS.get(key, 2))


def table(rows: Sequence[Row]) -> tuple[list[str], list[bool], list[list[str]]]:
    """The comparison table: header, which columns are numeric (right-aligned), and the cells."""
    setting_keys = _setting_columns(rows)
    show_variant = any(r.variant for r in rows)
    show_published = any(r.published() for r in rows)
    metrics = list(METRICS)
    if show_published:
        metrics[1:1] = ["published", "published_delta"]
    labels = METRICS | {"published": "Published (%)", "published_delta": "Δ vs published (pp)"}
    header = ["Method"] + (["Variant"] if show_variant else []) + [SETTING[k] for k in setting_keys]
    header += [labels[k] for k in metrics] + ["Seeds"]
    numeric = [False] * (len(header) - len(metrics) - 1) + [True] * (len(metrics) + 1)
    cells = []
    for row in rows:
        line = [row.method] + ([row.variant or "–"] if show_variant else [])
        line += ["–" if row.setting.get(k) is None else str(row.setting[k]) for k in setting_keys]
        published = row.published()
        for key in metrics:
            if key == "published":
                std = (published or {}).get("std")
                line.append("–" if not published else _fmt(published["final_accuracy"], std or 0.0,
                                                             2 if std is not None else 1))
            elif key == "published_delta":
                mean = row.mean_std("final_accuracy")[0]
                line.append("–" if not published or math.isnan(mean) else f"{mean - published['final_accuracy']:+.2f}")
            else:
                line.append(_metric_cell(row, key))
        line.append(str(len(row.runs)))
        cells.append(line)
    return header, numeric, cells


NOTE = ("Mean ± sample std over seeds (one seed: the mean alone); final acc. = mean of the last row of the accuracy "
        "matrix, avg. inc. acc. = mean over tasks of the average accuracy after each task, BWT = mean over earlier "
        "tasks j of A[T-1][j] − A[j][j], old/new acc. = accuracy on the earlier tasks' / the last task's classes "
        "after the last task, task-aware acc. = last row of the task-aware matrix, synth. = mean per task boundary "
        "of the synthesis wall time and full-model passes (— : no synthesis).")


def _sources(rows: Sequence[Row]) -> list[str]:
    return [f"{row.label}: {row.published().get('source') or 'no source given'}" for row in rows if row.published()]


def _dropped_lines(dropped: Sequence[tuple[Row, Run, list[Run]]]) -> list[str]:
    return [f"{_row_name(row)} seed {kept.results.seed}: kept {kept.path}, dropped "
            + ", ".join(str(r.path) for r in runs) for row, kept, runs in dropped]


def markdown_table(rows: Sequence[Row], failed: Sequence[Run],
                   dropped: Sequence[tuple[Row, Run, list[Run]]] = ()) -> str:
    header, numeric, cells = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    text = "\n".join(lines) + "\n\n" + NOTE + "\n"
    sources = _sources(rows)
    if sources:
        text += "\nPublished figures — " + "; ".join(sources) + ".\n"
    if dropped:
        text += "\n**Duplicate runs dropped (--keep-newest)** — the newest results.json of each is kept:\n\n"
        text += "".join(f"- {line}\n" for line in _dropped_lines(dropped))
    if failed:
        text += f"\n**Failed or incomplete runs ({len(failed)})** — not in the table above:\n\n"
        text += "| Run | Method | Status | Tasks done | Error |\n|---|---|---|---:|---|\n"
        for run in failed:
            done = run.progress()
            error = str(run.results.error or "").replace("|", "\\|").replace("\n", " ")[:200]
            text += f"| {run.path} | {run.results.method or '–'} | {run.status} | {done} | {error} |\n"
    return text


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "---", "–": "--",
        "Δ": r"$\Delta$", "−": "-"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text)


def _tex_cell(text: str, numeric: bool) -> str:
    """A cell in LaTeX: a number's sign is a math minus/plus, not a hyphen."""
    if numeric and text[:1] in "-+" and text[1:2].isdigit():
        return f"${text[0]}${_tex(text[1:])}"
    return _tex(text)


def latex_table(rows: Sequence[Row], failed: Sequence[Run] = (),
                dropped: Sequence[tuple[Row, Run, list[Run]]] = ()) -> str:
    """The same table as a booktabs tabular (needs \\usepackage{booktabs}); notes, dropped duplicates and
    failed runs follow as % comments, so the output pastes into a paper as it is."""
    header, numeric, cells = table(rows)
    lines = [r"\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_cell(c, n) for c, n in zip(line, numeric)) + r" \\" for line in cells]
    lines += [r"\bottomrule", r"\end{tabular}", "% " + NOTE]
    lines += ["% Published figures — " + s for s in _sources(rows)]
    lines += ["% Duplicate run dropped (--keep-newest): " + s for s in _dropped_lines(dropped)]
    if failed:
        lines.append(f"% Failed or incomplete runs ({len(failed)}) — not in the table above:")
        for run in failed:
            done = run.progress()
            error = str(run.results.error or "").replace("\n", " ")[:200]
            lines.append(f"% {run.path} | {run.results.method or '–'} | {run.status} | {done} | {error}")
    return "\n".join(lines) + "\n"


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
            per_run = [[sum(r) / len(r) for r in run.results.accuracy_matrix] for run in row.runs]
            n = min(len(c) for c in per_run)
            mean = [statistics.fmean(c[i] for c in per_run) for i in range(n)]
            std = [statistics.stdev([c[i] for c in per_run]) if len(per_run) > 1 else 0.0 for i in range(n)]
            curves[f"{row.label} (n={len(row.runs)})"] = (mean, std)
        suffix = "" if len(by_setting) == 1 else f"_{_slug(name)}"
        title = _setting_title(members[0].setting)
        written.append(accuracy_curves(curves, out / f"accuracy_curves{suffix}.png", title=title))
        for row in members:
            mean, std = _mean_matrix([run.results.accuracy_matrix for run in row.runs])
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
                             len(row.runs), " ".join(str(r.results.seed) for r in row.runs)])
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "status", "method", *setting_keys, "seed", "tasks_completed", *METRICS, "error"])
        for run in runs:
            setting = run.setting()
            r = run.results
            writer.writerow([run.path, run.status, r.method, *[setting.get(k) for k in setting_keys], r.seed,
                             r.tasks_completed, *[run_metric(r, k) for k in METRICS], r.error or ""])


def report(roots: Sequence[str | Path], out: str | Path | None = None, keep_newest: bool = False) -> dict[str, Any]:
    """Build the report for the runs below `roots`; returns rows, failed runs, dropped duplicates, the
    markdown and LaTeX tables and the written paths. Duplicate (config, seed) runs raise SystemExit unless
    `keep_newest`."""
    runs, missing = find_runs(roots)
    completed = [r for r in runs if r.status == "completed" and r.results.accuracy_matrix]
    failed = [r for r in runs if r not in completed] + missing
    rows = group_runs(completed)
    dropped = resolve_duplicates(rows, keep_newest)
    out = Path(out) if out is not None else Path(roots[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, failed, dropped)
    latex = latex_table(rows, failed, dropped)
    (out / "report.md").write_text(text)
    (out / "report.tex").write_text(latex)
    write_csvs(rows, runs + missing, out)
    plots = write_plots(rows, out)
    return {"rows": rows, "failed": failed, "dropped": dropped, "markdown": text, "latex": latex, "out": out,
            "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_inversion.report",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("dirs", nargs="+", help="run or sweep directories (searched recursively for results.json)")
    parser.add_argument("--out", help="output directory (default: <first dir>/report)")
    parser.add_argument("--format", choices=("markdown", "latex"), default="markdown",
                        help="table printed on stdout: markdown (default) or a booktabs LaTeX tabular")
    parser.add_argument("--keep-newest", action="store_true",
                        help="where one config and seed was run more than once, keep the newest results.json "
                             "(by its recorded end time, else its modification time) instead of failing")
    args = parser.parse_args(argv)
    result = report(args.dirs, args.out, keep_newest=args.keep_newest)
    for line in _dropped_lines(result["dropped"]):
        print(f"{PROG}: --keep-newest: {line}", file=sys.stderr)
    summary = (f"{len(result['rows'])} rows, {len(result['failed'])} failed/incomplete; written to {result['out']}: "
               f"report.md, report.tex, report.csv, runs.csv, {len(result['plots'])} plots")
    if args.format == "latex":
        print(result["latex"] + "% " + summary)
    else:
        print(result["markdown"])
        print(summary)
    return 1 if not result["rows"] and not result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
