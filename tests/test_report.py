"""`python -m cl_inversion.report` on hand-made results.json files: grouping, mean ± std, failures, outputs."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

from cl_inversion.io import write_json
from tests.conftest import REPO, cli_env


def fake_run(path: Path, method: str, seed: int, matrix: list[list[float]], status: str = "completed",
             temperature: float = 2.0, n_tasks: int | None = None) -> None:
    from cl_inversion.metrics import average_incremental_accuracy, final_average_accuracy, forgetting

    data = {"status": status, "method": method, "dataset": "digits", "backbone": "small_cnn",
            "n_tasks": n_tasks or len(matrix), "seed": seed, "tasks_completed": len(matrix), "accuracy_matrix": matrix,
            "config": {"seed": seed, "method": {"temperature": temperature}, "trainer": {"max_epochs": 1},
                       "scenario": {"n_tasks": n_tasks or len(matrix), "first_task_classes": None}}}
    if matrix:
        data |= {"final_accuracy": final_average_accuracy(matrix), "forgetting": forgetting(matrix),
                 "average_incremental_accuracy": average_incremental_accuracy(matrix)}
    if status == "failed":
        data["error"] = "RuntimeError: boom"
    write_json(path / "results.json", data)


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
