"""Bad input fails fast and clearly: exit code != 0, one message naming the key and what is allowed,
no traceback, and the run directory it points at (an earlier, completed run) left byte-identical."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO, cli_env, read_results, run_cli, run_in_process

BASE = ["method=finetune", "dataset=digits", "scenario.n_tasks=2", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "logger=none"]

# name -> (overrides on top of BASE, strings the message must contain, raised by: "cl" = us, "hydra")
CASES: dict[str, tuple[list[str], list[str], str]] = {
    "n_tasks_zero": (["scenario.n_tasks=0"], ["scenario.n_tasks=0", "1..10"], "cl"),
    "n_tasks_more_than_classes": (["scenario.n_tasks=11"], ["scenario.n_tasks=11", "1..10"], "cl"),
    "first_task_classes_inconsistent": (["scenario.n_tasks=3", "scenario.first_task_classes=5"],
                                        ["scenario.first_task_classes=5", "scenario.n_tasks=3"], "cl"),
    "unknown_method": (["method=lfw"], ["method/lfw", "Available options", "lwf", "ewc"], "hydra"),
    "unknown_dataset": (["dataset=cifar1O"], ["dataset/cifar1O", "Available options", "cifar10"], "hydra"),
    "unknown_experiment": (["experiment=abd_cifar100_10"],
                           ["experiment/abd_cifar100_10", "Available options", "abd_cifar100_10t"], "hydra"),
    "max_epochs_infinite": (["trainer.max_epochs=-1"], ["trainer.max_epochs=-1", ">= 1"], "cl"),
    "max_epochs_zero": (["trainer.max_epochs=0"], ["trainer.max_epochs=0", ">= 1"], "cl"),
    "n_images_zero": (["method=deepinversion", "inversion.n_images=0"], ["inversion.n_images=0", ">= 1"], "cl"),
    "n_images_negative": (["method=abd", "inversion.n_images=-5"], ["inversion.n_images=-5", ">= 1"], "cl"),
    "one_class_trained": (["scenario.n_tasks=1", "scenario.holdout_classes=9"],
                          ["only 1 class is trained", "trivial"], "cl"),
    "unknown_backbone": (["backbone=resnet"], ["backbone/resnet", "Available options", "resnet32"], "hydra"),
    "cifar10_root_missing": (["dataset=cifar10", "dataset.root=/nonexistent"],
                             ["dataset.root='/nonexistent' does not exist", "dataset.download=true"], "cl"),
    "imagefolder_root_missing": (["dataset=imagefolder", "dataset.root=/nonexistent"],
                                 ["dataset.root='/nonexistent' does not exist", "train/<class>"], "cl"),
    "seed_not_an_int": (["seed=abc"], ["seed=abc", "Integer"], "hydra"),
    "top_level_typo": (["sede=1"], ["sede"], "hydra"),
    "group_key_typo": (["trainer.max_epoch=2"], ["trainer.max_epoch"], "hydra"),
    "added_unknown_key": (["+trainer.max_epoch=2"], ["trainer.max_epoch is not a parameter", "max_epochs"], "cl"),
    "group_value_wrong_type": (["method=lwf", "method.temperature=abc"],
                               ["method.temperature='abc'", "float"], "cl"),
    "finetune_scope_unknown": (["method=rdfcil", "method.finetune_scope=backbone"],
                               ["method.finetune_scope='backbone'", "head, all"], "cl"),
    "cuda_graph_without_cuda": (["method=deepinversion", "trainer.accelerator=cpu", "inversion.pixel.cuda_graph=true"],
                                ["inversion.pixel.cuda_graph=true needs a CUDA device", "false or auto"], "cl"),
    "cuda_graph_not_a_choice": (["method=abd", "inversion.generator.cuda_graph=always"],
                                ["inversion.generator.cuda_graph='always'", "true, false or auto"], "cl"),
    "resume_with_other_config": (["resume=true", "seed=5"], ["cannot resume", "differs", "seed"], "cl"),
    # pointed at a directory holding only a results.json (a run that failed before its first checkpoint)
    "resume_with_nothing_to_resume": (["resume=true"], ["resume=true", "holds no task_<t>.ckpt"], "cl"),
}
NO_CHECKPOINT = {"resume_with_nothing_to_resume"}


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.name.endswith(".log")
            and ".hydra" not in p.parts}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """One completed run (in this process), then every bad command pointed at it (four at a time)."""
    base = tmp_path_factory.mktemp("errors")
    run_dir, failed_dir = base / "run", base / "failed"
    run_in_process(*BASE, run_dir=run_dir)
    failed_dir.mkdir()
    (failed_dir / "results.json").write_text('{"status": "failed"}')
    before = {d: snapshot(d) for d in (run_dir, failed_dir)}
    assert "results.json" in before[run_dir] and "checkpoints/task_1.ckpt" in before[run_dir]

    def launch(name: str) -> subprocess.CompletedProcess:
        target = failed_dir if name in NO_CHECKPOINT else run_dir
        args = [sys.executable, "-m", "cl_inversion", *BASE, *CASES[name][0], f"hydra.run.dir={target}"]
        return subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = dict(zip(CASES, pool.map(launch, CASES)))
    return procs, before, {d: snapshot(d) for d in before}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_clearly_and_leaves_the_run_intact(outcomes, name):
    procs, before, after = outcomes
    proc = procs[name]
    _, expected, source = CASES[name]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if source == "cl":  # our errors: exactly one line, prefixed, exit code 2
        lines = [line for line in proc.stderr.splitlines() if line.startswith("cl-inversion: error:")]
        assert len(lines) == 1, proc.stderr[-3000:]
        message = lines[0]
        assert proc.returncode == 2
    else:
        message = proc.stderr
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert after == before  # results.json and checkpoints byte-identical


def test_non_finite_training_loss_stops_the_run_naming_task_epoch_and_step(tmp_path):
    proc = run_cli(*BASE, "optimizer.lr=nan", run_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cl-inversion: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "training loss is nan" in lines[0] and "task 1/2" in lines[0] and "epoch 1/1" in lines[0], lines
    assert "step" in lines[0]
    res = read_results(tmp_path)
    assert res["status"] == "failed" and "TrainingDiverged" in res["error"] and res["tasks_completed"] == 0


def test_single_task_sequence_is_warned_about(tmp_path, caplog):
    res = run_in_process(*BASE, "scenario.n_tasks=1", run_dir=tmp_path)
    assert "warning: scenario.n_tasks=1" in caplog.text
    assert res["status"] == "completed"
