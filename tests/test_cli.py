"""The whole program on digits: the experiment `run(compose(overrides))` runs (what the CLI runs, in this
process), and the CLI itself: its console lines and `--help`."""

import logging

import torch
from helpers import FAST, read_results, run_cli, run_in_process


def test_default_run_writes_results_and_checkpoints(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cl_inversion")
    res = run_in_process(*FAST, "inversion.per_layer.layer_steps=5", "inversion.per_layer.full_steps=10",
                         run_dir=tmp_path)
    matrix = res["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2, 3, 4, 5]
    for key in ("final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer",
                "old_class_accuracy", "new_class_accuracy", "task_aware_accuracy", "class_order", "seed",
                "config"):
        assert key in res, key
    assert res["status"] == "completed" and res["config"]["scenario"]["n_tasks"] == 5 and res["method"] == "pmi"
    assert sorted(res["class_order"]) == list(range(10))
    assert res["final_accuracy"] == sum(matrix[-1]) / 5
    assert all((tmp_path / "checkpoints" / f"task_{t}.ckpt").exists() for t in range(5))
    ckpt = torch.load(tmp_path / "checkpoints" / "task_4.ckpt", weights_only=False)
    assert ckpt["task_sizes"] == [2, 2, 2, 2, 2]
    assert "task 5/5" in caplog.text
    assert (tmp_path / "logs" / "metrics.csv").exists()


def test_same_seed_same_matrix_other_seed_other_order(tmp_path):
    ra = run_in_process(*FAST, "method=lwf", "scenario.n_tasks=2", run_dir=tmp_path / "a")
    rb = run_in_process(*FAST, "method=lwf", "scenario.n_tasks=2", run_dir=tmp_path / "b")
    rc = run_in_process(*FAST, "method=lwf", "scenario.n_tasks=2", "seed=1", run_dir=tmp_path / "c")
    assert ra["accuracy_matrix"] == rb["accuracy_matrix"]
    assert ra["class_order"] != rc["class_order"] and rc["seed"] == 1


def test_first_task_classes_and_joint_upper_bound(tmp_path):
    res = run_in_process("trainer.enable_progress_bar=false", "method=joint", "scenario.n_tasks=3",
                         "scenario.first_task_classes=4", run_dir=tmp_path)
    assert [len(r) for r in res["accuracy_matrix"]] == [1, 2, 3]
    assert res["per_task"][0]["classes"] == res["class_order"][:4]
    assert res["final_accuracy"] >= 95


def test_python_api_runs_the_same_experiment(compose, tmp_path):
    from cl_inversion.run import run

    cfg = compose(["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "scenario.n_tasks=2",
                   "logger=none"])
    res = run(cfg, run_dir=tmp_path)
    assert len(res["accuracy_matrix"]) == 2 and (tmp_path / "results.json").exists()


def test_results_record_provenance_and_wall_times(tmp_path):
    res = run_in_process("method=finetune", "scenario.n_tasks=2", "trainer.max_epochs=1",
                         "trainer.enable_progress_bar=false", "logger=none", run_dir=tmp_path)
    prov = res["provenance"]
    import lightning

    assert prov["torch"] == torch.__version__ and prov["lightning"] == lightning.__version__
    assert prov["cl_inversion"] and prov["device"] == "cpu" and prov["started_at"] <= prov["ended_at"]
    assert prov["git"] is None or len(prov["git"]["commit"]) == 40  # a checkout records its commit
    walls = [t["wall_s"] for t in res["per_task"]]
    assert len(walls) == 2 and all(w >= t["train_time_s"] > 0 for w, t in zip(walls, res["per_task"]))
    assert abs(res["wall_s"] - sum(walls)) < 1e-6


def test_console_is_one_line_per_event_and_help_lists_what_users_pick(tmp_path):
    proc = run_cli("method=finetune", "scenario.n_tasks=2", "trainer.max_epochs=1", "logger=none", run_dir=tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    # start (method, dataset, seed, device, threads, run dir), one line per task, the final line; no progress
    # bar in a log (stderr is not a terminal here) and no Lightning line printed twice
    assert len(lines) == 4, lines
    assert "starting finetune on digits" in lines[0] and "seed 0" in lines[0] and "cpu" in lines[0]
    assert "profile digits_cpu" in lines[0]  # the budget a run gets is on its first line
    config = read_results(tmp_path)["config"]
    assert config["profile"] == "digits_cpu" and "inversion" not in config  # no synthesis: no engine settings
    assert "task 1/2" in lines[1] and "task 2/2" in lines[2]
    assert "final accuracy" in lines[-1] and str(tmp_path / "results.json") in lines[-1]
    assert not any("it/s" in line or "GPU available" in line for line in lines)

    help_out = run_cli("--help").stdout
    assert "method: abd, deepinversion" in help_out and "hydra/launcher: local, slurm" in help_out
    assert "profile: cifar10_cpu, digits_cpu, published, smoke" in help_out
    assert "inversion/engine: generator, none, per_layer, pixel, rdfcil_generator, remix" in help_out
    for internal in ("budget:", "budget/digits_cpu:", "smoke:", "experiment/base:"):
        assert f"\n{internal}" not in help_out
