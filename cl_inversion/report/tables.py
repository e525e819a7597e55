"""The report's table: cells (mean ± std over seeds, the published figure and the difference), markdown and LaTeX."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cl_inversion.report.runs import DIGITS, METRICS, SETTING, SYNTHESIS, Row, Run, _row_name


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
