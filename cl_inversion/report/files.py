"""What the report writes: report.md / .tex / .csv, runs.csv and the plots; `report()` does it all."""

from __future__ import annotations

import csv
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_inversion.report.plots import accuracy_curves, accuracy_heatmap
from cl_inversion.report.runs import (
    METRICS,
    SETTING,
    Row,
    Run,
    _setting_name,
    _setting_title,
    find_runs,
    group_runs,
    resolve_duplicates,
    run_metric,
)
from cl_inversion.report.tables import latex_table, markdown_table


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:120]


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
