"""Multirun sweeps through the submitit launcher, job independence, DDP on CPU, the SLURM launcher config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli_env, read_results, run_cli

QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "scenario.n_tasks=2"]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cl_inversion.report", *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def method_sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("sweep")
    env = cli_env()
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):  # the threads come from the cores and the job count
        env.pop(name, None)
    run_cli("-m", "hydra/launcher=local", "method=finetune,lwf", *QUICK, f"hydra.sweep.dir={sweep}", env=env)
    return sweep


def test_local_launcher_sweep_gives_one_run_dir_and_results_per_job(method_sweep):
    dirs = job_dirs(method_sweep)
    assert len(dirs) == 2
    results = [read_results(d) for d in dirs]
    assert sorted(r["method"] for r in results) == ["finetune", "lwf"]
    for r in results:
        assert r["status"] == "completed" and r["tasks_completed"] == 2
        assert [len(row) for row in r["accuracy_matrix"]] == [1, 2]
    assert (method_sweep / ".submitit").is_dir()  # really went through submitit, not the basic launcher
    from cl_inversion.utils.threads import available_cores

    # the two jobs run at once: each gets half the cores (oversubscribed OpenMP threads spin)
    assert [r["threads"] for r in results] == [max(1, available_cores() // 2)] * 2


def test_report_on_sweep_prints_two_rows_and_writes_plots(method_sweep, tmp_path):
    proc = report_cli(method_sweep, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| finetune") or line.startswith("| lwf")]
    assert len(rows) == 2, proc.stdout
    assert "Failed" not in proc.stdout
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "accuracy_curves.png" in pngs and len([p for p in pngs if p.startswith("heatmap_")]) == 2
    assert all((tmp_path / p).stat().st_size > 5000 for p in pngs)
    assert (tmp_path / "report.md").read_text().count("\n| ") >= 2


def test_failed_job_leaves_the_other_intact_and_is_reported(tmp_path):
    sweep = tmp_path / "sweep"
    # n_tasks=3 does not divide the 10 digit classes: that job fails while building the scenario.
    proc = run_cli("-m", "hydra/launcher=local", "method=finetune", "scenario.n_tasks=2,3", "trainer.max_epochs=1",
                   "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode != 0  # the sweep reports the failure...
    tally = [line for line in proc.stdout.splitlines() if line.startswith(f"sweep {sweep}:")]
    assert len(tally) == 1 and "1 of 2 jobs completed, 1 not:" in tally[0] and "(failed)" in tally[0], proc.stdout
    results = {read_results(d)["n_tasks"]: read_results(d) for d in job_dirs(sweep)}
    assert results[2]["status"] == "completed" and len(results[2]["accuracy_matrix"]) == 2  # ...the other job ran
    assert results[3]["status"] == "failed" and "n_tasks" in results[3]["error"]
    report = report_cli(sweep, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    failed_section = report.stdout.split("Failed or incomplete runs (1)")[1]
    assert "n_tasks=3" in failed_section and "failed" in failed_section
    assert report.stdout.count("| finetune |") == 2  # one table row + one failed-run row


@pytest.mark.slow
def test_ddp_cpu_under_multirun_matches_single_process(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("-m", "trainer=cpu,ddp_cpu", "method=lwf", "scenario.n_tasks=2", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}")
    dirs = job_dirs(sweep)
    assert len(dirs) == 2  # ddp_spawn did not re-launch the sweep or write elsewhere
    single, ddp = (read_results(d) for d in dirs)
    assert single["config"]["trainer"]["devices"] == 1 and ddp["config"]["trainer"]["devices"] == 2
    assert ddp["status"] == "completed"
    assert [len(r) for r in ddp["accuracy_matrix"]] == [len(r) for r in single["accuracy_matrix"]] == [1, 2]
    for a, b in zip(sum(single["accuracy_matrix"], []), sum(ddp["accuracy_matrix"], [])):
        assert abs(a - b) <= 20, (single["accuracy_matrix"], ddp["accuracy_matrix"])
    assert min(ddp["accuracy_matrix"][0][0], ddp["accuracy_matrix"][1][1]) > 70  # it learned each task
    # metrics.csv kept the workers' training losses and the main process's evaluation rows
    header = (dirs[1] / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"task_0/loss", "task_1/kd", "eval/accuracy_task_1", "summary/final_accuracy"} <= set(header)


@pytest.mark.slow
def test_staged_pmi_trains_under_ddp_cpu(tmp_path):
    """PMI freezes and unfreezes backbone groups mid-task and leaves its RKD projection out of some stages: DDP
    must find the unused parameters (conf/trainer/ddp_cpu.yaml), and the stage's fresh optimiser must reach the
    spawned workers."""
    run_cli("method=pmi", "trainer=ddp_cpu", "scenario.n_tasks=2", "trainer.max_epochs=5", "logger=none",
            "inversion.per_layer.layer_steps=2", "inversion.per_layer.full_steps=2",
            "inversion.per_layer.contrastive_epochs=2", "inversion.n_images=40", "trainer.enable_progress_bar=false",
            run_dir=tmp_path)
    res = read_results(tmp_path)
    assert res["status"] == "completed" and res["config"]["trainer"]["devices"] == 2
    assert res["accuracy_matrix"][1][1] > 50  # the second task is learned through the head / unfrozen stages


def test_slurm_launcher_config_matches_trainer_devices(tmp_path):
    """tasks_per_node = gpus_per_node = trainer.devices in the sbatch script (a mismatch hangs Lightning)."""
    code = f"""
import json, hydra
from hydra.utils import instantiate
from submitit.slurm.slurm import _make_sbatch_string
from cl_inversion.utils.config import register_configs
from cl_inversion.run import CONFIG_DIR
register_configs()
with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
    cfg = hydra.compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                        "hydra.launcher.partition=gpu", "hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
launcher = instantiate(cfg.hydra.launcher)
params = launcher.params
sbatch = _make_sbatch_string(command="python x.py", folder="{tmp_path}", partition=params["partition"],
                             gpus_per_node=params["gpus_per_node"], ntasks_per_node=params["tasks_per_node"],
                             cpus_per_task=params["cpus_per_task"], time=params["timeout_min"])
print(json.dumps({{"params": params, "sbatch": sbatch, "launcher": type(launcher).__name__}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    params = out["params"]
    assert out["launcher"] == "SlurmLauncher"
    assert params["gpus_per_node"] == params["tasks_per_node"] == 4
    assert params["max_num_timeout"] > 0  # submitit owns requeue...
    assert "#SBATCH --gpus-per-node=4" in out["sbatch"] and "#SBATCH --ntasks-per-node=4" in out["sbatch"]
    assert "#SBATCH --partition=gpu" in out["sbatch"]


def test_lightning_does_not_requeue_under_submitit_slurm(monkeypatch, compose):
    """...so Lightning's SLURM environment gets auto_requeue=False when submitit runs the job on SLURM."""
    from cl_inversion.loop.task_loop import cluster_plugins

    cfg = compose(["trainer=ddp"])
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert cluster_plugins(cfg) == {}
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    (plugin,) = cluster_plugins(cfg)["plugins"]
    assert plugin.auto_requeue is False
