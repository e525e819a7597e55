"""`python -m cl_inversion.report` on hand-made results.json files: grouping, mean ± std, failures, outputs."""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

from helpers import REPO, cli_env

from cl_inversion.utils.io import write_json


def fake_run(path: Path, method: str, seed: int, matrix: list[list[float]], status: str = "completed",
             temperature: float = 2.0, n_tasks: int | None = None, **extra) -> Path:
    """A results.json as `cl_inversion.run` writes it; `extra` adds or overrides top-level keys
    (task_aware_matrix, per_task, inversion, old_class_accuracy, ..., or `published` for the config)."""
    from cl_inversion.loop.metrics import average_incremental_accuracy, final_average_accuracy, forgetting

    published = extra.pop("published", None)
    data = {"status": status, "method": method, "dataset": "digits", "backbone": "small_cnn",
            "n_tasks": n_tasks or len(matrix), "seed": seed, "tasks_completed": len(matrix), "accuracy_matrix": matrix,
            "config": {"seed": seed, "method": {"temperature": temperature}, "trainer": {"max_epochs": 1},
                       "scenario": {"n_tasks": n_tasks or len(matrix), "first_task_classes": None},
                       **({"published": published} if published else {})}}
    if matrix:
        data |= {"final_accuracy": final_average_accuracy(matrix), "forgetting": forgetting(matrix),
                 "average_incremental_accuracy": average_incremental_accuracy(matrix)}
    if status == "failed":
        data["error"] = "RuntimeError: boom"
    write_json(path / "results.json", data | extra)
    return path


def table_rows(text: str) -> list[dict[str, str]]:
    """The comparison table's rows (header → cell) from markdown output (the first table only)."""
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def report_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cl_inversion.report", *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def test_report_means_over_seeds_and_lists_failures(tmp_path):
    lwf = {0: [[90.0], [60.0, 95.0]], 1: [[80.0], [50.0, 85.0]], 2: [[100.0], [40.0, 90.0]]}
    for seed, matrix in lwf.items():
        fake_run(tmp_path / f"lwf_s{seed}", "lwf", seed, matrix)
    fake_run(tmp_path / "ft_s0", "finetune", 0, [[90.0], [0.0, 99.0]])
    fake_run(tmp_path / "lwf_T1", "lwf", 0, [[90.0], [70.0, 90.0]], temperature=1.0)  # another variant, not a seed
    fake_run(tmp_path / "crashed", "lwf", 3, [[90.0]], status="failed", n_tasks=2)
    (tmp_path / "killed" / ".hydra").mkdir(parents=True)  # a job that never wrote results.json
    (tmp_path / "killed" / ".hydra" / "overrides.yaml").write_text("- method=finetune\n")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "results.json").write_text("{not json")

    proc = report_cli(tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    lwf_rows = [line for line in lines if line.startswith("| lwf | method.temperature=2.0")]
    assert len(lwf_rows) == 1
    finals = [(row[0] + row[1]) / 2 for row in (m[-1] for m in lwf.values())]
    expected = f"{statistics.fmean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert expected in lwf_rows[0] and lwf_rows[0].rstrip().endswith("| 3 |")
    assert any(line.startswith("| lwf | method.temperature=1.0") for line in lines)
    assert any(line.startswith("| finetune | –") and "| 1 |" in line for line in lines)
    failed = proc.stdout.split("Failed or incomplete runs (3)")[1]
    assert "crashed" in failed and "1/2" in failed and "boom" in failed
    assert "killed" in failed and "no results.json" in failed
    assert "garbled" in failed and "unreadable" in failed

    out = tmp_path / "out"
    with open(out / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    row = next(r for r in rows if r["method"] == "lwf" and r["variant"] == "method.temperature=2.0")
    assert abs(float(row["final_accuracy_mean"]) - statistics.fmean(finals)) < 1e-9 and row["n_seeds"] == "3"
    with open(out / "runs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8  # every run, failed ones included
    assert (out / "report.md").read_text().startswith("| Method |")
    assert (out / "accuracy_curves.png").stat().st_size > 5000
    assert len(list(out.glob("heatmap_*.png"))) == 3


def test_report_fails_on_missing_dir(tmp_path):
    proc = report_cli(tmp_path / "nope")
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_duplicate_config_and_seed_is_an_error_naming_both_dirs(tmp_path):
    fake_run(tmp_path / "a" / "lwf_s0", "lwf", 0, [[90.0], [60.0, 95.0]])
    fake_run(tmp_path / "b" / "lwf_s0_again", "lwf", 0, [[90.0], [60.0, 95.0]])  # same config, same seed
    fake_run(tmp_path / "a" / "lwf_s1", "lwf", 1, [[80.0], [50.0, 85.0]])
    fake_run(tmp_path / "a" / "lwf_T1_s0", "lwf", 0, [[80.0], [50.0, 85.0]], temperature=1.0)  # another config

    proc = report_cli(tmp_path, "--out", tmp_path / "out")
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cl_inversion.report: error:") and "--keep-newest" in line
    assert str(tmp_path / "a" / "lwf_s0") in line and str(tmp_path / "b" / "lwf_s0_again") in line
    assert "lwf_s1" not in line and "lwf_T1_s0" not in line and "seed 0" in line
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_keep_newest_drops_the_older_duplicate_and_says_so(tmp_path):
    old = fake_run(tmp_path / "old_s0", "lwf", 0, [[90.0], [0.0, 90.0]])
    new = fake_run(tmp_path / "new_s0", "lwf", 0, [[90.0], [60.0, 100.0]])
    fake_run(tmp_path / "s1", "lwf", 1, [[90.0], [40.0, 100.0]])
    fake_run(tmp_path / "crashed_s0", "lwf", 0, [[90.0]], status="failed", n_tasks=2)  # a failure is no duplicate
    os.utime(new / "results.json", (2_000_000_000, 2_000_000_000))  # newest although its name sorts after
    os.utime(old / "results.json", (1_000_000_000, 1_000_000_000))

    proc = report_cli(tmp_path, "--keep-newest", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    (row,) = table_rows(proc.stdout)
    finals = [(60.0 + 100.0) / 2, (40.0 + 100.0) / 2]
    assert row["Final acc. (%)"] == f"{statistics.fmean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert row["Seeds"] == "2"
    (note,) = [line for line in proc.stderr.splitlines() if "dropped" in line]
    assert note.startswith("cl_inversion.report: --keep-newest:")
    assert f"kept {new}" in note and f"dropped {old}" in note
    assert f"dropped {old}" in (tmp_path / "out" / "report.md").read_text()
    failed = proc.stdout.split("Failed or incomplete runs (1)")[1]
    assert "crashed_s0" in failed and "boom" in failed


def test_one_seed_shows_the_mean_alone_and_a_count_of_one(tmp_path):
    fake_run(tmp_path / "ft_s0", "finetune", 0, [[90.0], [10.0, 99.0]])
    fake_run(tmp_path / "ft_s0_crashed", "finetune", 0, [[90.0]], status="failed", n_tasks=2)

    proc = report_cli(tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    (row,) = table_rows(proc.stdout)
    assert row["Final acc. (%)"] == "54.50" and row["Forgetting (%)"] == "80.00" and row["Seeds"] == "1"
    assert "±" not in "".join(row.values())
    assert "Failed or incomplete runs (1)" in proc.stdout and "ft_s0_crashed" in proc.stdout


def test_bwt_old_new_task_aware_and_synthesis_cost_columns(tmp_path):
    # deepinversion, 3 tasks of 4, 3 and 3 classes, as the run records it (old/new accuracy and the
    # inversion callback's per-boundary records); one run per seed.
    di = {0: ([[90.0], [70.0, 80.0], [50.0, 60.0, 70.0]], [10.0, 20.0]),
          1: ([[80.0], [60.0, 90.0], [40.0, 70.0, 80.0]], [30.0, 50.0])}
    for seed, (matrix, walls) in di.items():
        fake_run(tmp_path / f"di_s{seed}", "deepinversion", seed, matrix,
                 task_aware_matrix=[[100.0], [90.0, 95.0], [80.0 + seed, 85.0, 90.0]],
                 per_task=[{"task": t, "classes": list(range(n))} for t, n in enumerate((4, 3, 3))],
                 old_class_accuracy=55.0 + seed, new_class_accuracy=matrix[-1][-1],
                 inversion=[{"task": t, "engine": "pixel", "wall_s": w, "full_model_passes": 400.0}
                            for t, w in enumerate(walls)])
    # an older results.json without old/new accuracy: computed from the matrix and the task sizes
    fake_run(tmp_path / "ft_s0", "finetune", 0, [[90.0], [70.0, 80.0], [20.0, 50.0, 95.0]],
             per_task=[{"task": t, "classes": list(range(n))} for t, n in enumerate((4, 3, 3))])

    proc = report_cli(tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    rows = {row["Method"]: row for row in table_rows(proc.stdout)}
    di_row, ft = rows["deepinversion"], rows["finetune"]

    def mean_std(values):
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"

    bwt = [((50.0 - 90.0) + (60.0 - 80.0)) / 2, ((40.0 - 80.0) + (70.0 - 90.0)) / 2]
    assert di_row["BWT (%)"] == mean_std(bwt)
    assert di_row["Old acc. (%)"] == mean_std([55.0, 56.0]) and di_row["New acc. (%)"] == mean_std([70.0, 80.0])
    assert di_row["Task-aware acc. (%)"] == mean_std([(80.0 + 85.0 + 90.0) / 3, (81.0 + 85.0 + 90.0) / 3])
    assert di_row["Synth. s / boundary"] == mean_std([15.0, 40.0])
    assert di_row["Synth. passes / boundary"] == "400.0 ± 0.0"
    assert ft["BWT (%)"] == f"{((20.0 - 90.0) + (50.0 - 80.0)) / 2:.2f}"
    assert ft["Old acc. (%)"] == f"{(4 * 20.0 + 3 * 50.0) / 7:.2f}" and ft["New acc. (%)"] == "95.00"
    assert ft["Task-aware acc. (%)"] == "–"  # not recorded by this run
    assert ft["Synth. s / boundary"] == ft["Synth. passes / boundary"] == "—"  # finetune does not synthesise
    with open(tmp_path / "out" / "report.csv") as handle:
        csv_row = next(r for r in csv.DictReader(handle) if r["method"] == "deepinversion")
    assert float(csv_row["synthesis_s_mean"]) == 27.5 and float(csv_row["backward_transfer_mean"]) == -30.0


def test_latex_format_prints_a_booktabs_tabular_of_the_same_table(tmp_path):
    for seed, matrix in {0: [[90.0], [60.0, 95.0]], 1: [[80.0], [50.0, 85.0]]}.items():
        fake_run(tmp_path / f"lwf_s{seed}", "lwf", seed, matrix)
    fake_run(tmp_path / "crashed", "lwf", 3, [[90.0]], status="failed", n_tasks=2)

    proc = report_cli(tmp_path, "--format", "latex", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{l") and lines[1] == r"\toprule" and lines[3] == r"\midrule"
    assert lines[2].startswith("Method & Dataset & Tasks & Backbone & Final acc. (\\%) &")
    assert lines[2].endswith(r"& Seeds \\")
    (row,) = [line for line in lines if line.startswith("lwf &")]
    cells = [c.strip() for c in row.removesuffix(r"\\").split("&")]
    assert cells[:4] == ["lwf", "digits", "2", r"small\_cnn"] and cells[-1] == "2"
    finals = [(60.0 + 95.0) / 2, (50.0 + 85.0) / 2]
    assert cells[4] == f"{statistics.fmean(finals):.2f} $\\pm$ {statistics.stdev(finals):.2f}"
    assert cells[7] == "$-$30.00 $\\pm$ 0.00"  # BWT: a math minus
    assert cells[-3:-1] == ["---", "---"]  # no synthesis
    assert r"\bottomrule" in lines and r"\end{tabular}" in lines
    assert not any(line.startswith("|") for line in lines)  # no markdown; the rest are % comments
    after = lines[lines.index(r"\end{tabular}") + 1:]
    assert after and all(line.startswith("%") for line in after)
    assert any("crashed" in line and "boom" in line for line in after)  # failed runs still reported
    assert (tmp_path / "out" / "report.md").read_text().startswith("| Method |")  # markdown file unchanged
    assert (tmp_path / "out" / "report.tex").read_text().startswith(r"\begin{tabular}")


def test_no_results_json_under_dir_is_an_error(tmp_path):
    empty = tmp_path / "sweep"
    (empty / "job" / ".submitit").mkdir(parents=True)
    (empty / "job" / ".submitit" / "results.json").write_text("{}")  # submitit's own files do not count
    proc = report_cli(empty)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip() == f"cl_inversion.report: error: no results.json under {empty}"
    assert not (empty / "report").exists()


def test_published_figure_is_shown_beside_ours_with_the_difference(tmp_path):
    published = {"final_accuracy": 43.9, "std": 0.9, "source": "ABD (Smith et al., ICCV 2021), Table 1"}
    for seed, matrix in {0: [[90.0], [40.0, 50.0]], 1: [[80.0], [30.0, 60.0]]}.items():
        fake_run(tmp_path / f"abd_s{seed}", "abd", seed, matrix, published=published)
    fake_run(tmp_path / "ft_s0", "finetune", 0, [[90.0], [0.0, 99.0]])

    proc = report_cli(tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    rows = {row["Method"]: row for row in table_rows(proc.stdout)}
    assert rows["abd"]["Published (%)"] == "43.90 ± 0.90" and rows["abd"]["Δ vs published (pp)"] == "+1.10"
    assert rows["finetune"]["Published (%)"] == rows["finetune"]["Δ vs published (pp)"] == "–"
    assert "abd: ABD (Smith et al., ICCV 2021), Table 1" in proc.stdout
