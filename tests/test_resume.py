"""Kill, resume, requeue, corrupted checkpoints, per-job sweep failures, determinism: real CLI runs."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli_env, read_results, run_cli

COMMON = ["dataset=digits", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none", "seed=3",
          "+callbacks.probe._target_=tests.probe.StateProbe"]
# ++: every engine's settings in one list; a run keeps those of its own engine and drops the others
SMALL_SYNTHESIS = ["inversion.n_images=64", "++inversion.pixel.steps=5", "++inversion.pixel.batch_size=32",
                   "++inversion.generator.steps=5", "++inversion.generator.batch_size=32",
                   "++inversion.rdfcil_generator.steps=5", "++inversion.rdfcil_generator.batch_size=32",
                   "++inversion.per_layer.layer_steps=2", "++inversion.per_layer.full_steps=3",
                   "++inversion.per_layer.batch_size=32"]
METHOD_ARGS = {"lwf": ["method=lwf"], "ewc": ["method=ewc", "method.fisher_samples=64"],
               # every method that keeps an engine or extra state across tasks
               "deepinversion": ["method=deepinversion", *SMALL_SYNTHESIS],
               "abd": ["method=abd", *SMALL_SYNTHESIS],
               "abd_head_all": ["method=abd", "method.head_classes=all", *SMALL_SYNTHESIS],
               "rdfcil": ["method=rdfcil", *SMALL_SYNTHESIS],
               "pmi": ["method=pmi", *SMALL_SYNTHESIS],
               "remix": ["method=remix", *SMALL_SYNTHESIS, "inversion.remix.layer_steps=2",  # + its covariances
                         "inversion.remix.full_steps=3", "inversion.remix.batch_size=32",
                         "inversion.remix.laplace_fit_epochs=5"],
               "vdfd": ["method=vdfd"],
               # prompts, block statistics and the statistics model (the tiny random open_clip model)
               "moe_adapter": ["method=moe_adapter", "backbone=moe_clip_tiny", "inversion.vit_per_layer.layer_steps=2",
                               "inversion.vit_per_layer.start_steps=3", "inversion.vit_per_layer.start_upsample=[1,2]",
                               "inversion.vit_per_layer.full_steps=2", "inversion.vit_per_layer.per_class=2",
                               "inversion.vit_per_layer.boost_rate=2", "inversion.vit_per_layer.contrastive_epochs=2",
                               "inversion.vit_per_layer.progress=false"]}


def env(**extra: str) -> dict[str, str]:
    """One thread per process: two runs in parallel on two cores, and identical float reductions."""
    e = cli_env()
    e.pop("SLURM_RESTART_COUNT", None)
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra})
    return e


def start_cli(*overrides: str, run_dir: Path, extra_env: dict[str, str] | None = None,
              stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """`python -m cl_inversion` in the background (stderr merged into stdout unless asked)."""
    args = [sys.executable, "-m", "cl_inversion", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(args, cwd=REPO, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_when_exists(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "task_4.ckpt", map_location="cpu", weights_only=False)


def assert_same_run(a: Path, b: Path) -> None:
    """Same accuracy matrices (exact), same final weights, same method and callback state."""
    ra, rb = read_results(a), read_results(b)
    assert rb["status"] == "completed" and rb["tasks_completed"] == 5
    assert rb["accuracy_matrix"] == ra["accuracy_matrix"]
    assert rb["task_aware_matrix"] == ra["task_aware_matrix"]
    ca, cb = final_checkpoint(a), final_checkpoint(b)
    assert ca["net"].keys() == cb["net"].keys()
    for key in ca["net"]:
        assert torch.equal(ca["net"][key], cb["net"][key]), key
    assert_same_state(ca["method"], cb["method"], "method")  # EWC slots, VDFD terms, relation projections...
    assert len(ca["callbacks"]["StateProbe"]["draws"]) == 5
    assert_same_state(ca["callbacks"], cb["callbacks"], "callbacks")  # engines, replay buffers


def assert_same_state(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif not where.endswith(("wall_s", "_s")):  # timings differ between runs
        assert a == b, where


FAST_RESUME = ("lwf", "pmi")  # the fast tier resumes one method without and one with an engine; the rest: slow


@pytest.mark.parametrize("method", [m if m in FAST_RESUME else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHOD_ARGS])
def test_sigkill_after_second_task_then_resume_matches_uninterrupted(tmp_path, method):
    args = [*METHOD_ARGS[method], *COMMON]
    full = start_cli(*args, run_dir=tmp_path / "full")
    killed_dir = tmp_path / "killed"
    killed = start_cli(*args, run_dir=killed_dir)
    # task_1.ckpt (0-based) is written, atomically, once the second task is trained and evaluated.
    kill_when_exists(killed, killed_dir / "checkpoints" / "task_1.ckpt")
    assert not (killed_dir / "checkpoints" / "task_4.ckpt").exists()
    if (killed_dir / "results.json").exists():
        assert read_results(killed_dir)["status"] == "running"

    requeued_dir = tmp_path / "requeued"  # the same killed state, continued as a SLURM requeue would
    shutil.copytree(killed_dir, requeued_dir)
    resumed = start_cli(*args, "resume=true", run_dir=killed_dir)
    requeued = start_cli(*args, run_dir=requeued_dir, extra_env={"SLURM_RESTART_COUNT": "1"})
    out_resumed, out_requeued = finish(resumed), finish(requeued)
    finish(full)

    # task_1.ckpt first appears right after task 1's training (before synthesis) for the inversion methods
    assert "resuming" in out_resumed and ("after task" in out_resumed or "after the training of task" in out_resumed)
    assert "SLURM requeue" in out_requeued and "resuming" in out_requeued
    assert "task 1/5" not in out_resumed  # task 0 was not trained again
    assert_same_run(tmp_path / "full", killed_dir)
    assert_same_run(tmp_path / "full", requeued_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A completed 3-task finetune run (one epoch per task)."""
    args = ["method=finetune", "dataset=digits", "scenario.n_tasks=3", "scenario.first_task_classes=4",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none"]
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_cli(*args, run_dir=run_dir, env=env())
    return run_dir, args


def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path, finished_run):
    source, args = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    ckpt = run_dir / "checkpoints" / "task_2.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = (run_dir / "results.json").read_bytes()

    fallback_dir = tmp_path / "fallback"
    shutil.copytree(run_dir, fallback_dir)

    plain = start_cli(*args, "resume=true", run_dir=run_dir, stderr=subprocess.PIPE)
    # Only when asked: set the corrupt file aside and continue from the intact checkpoint before it.
    fallback = start_cli(*args, "resume=true", "resume_fallback=true", run_dir=fallback_dir)
    _, err = plain.communicate(timeout=300)
    assert plain.returncode == 2
    assert str(ckpt) in err and "truncated or corrupted" in err
    assert "Traceback" not in err
    assert (run_dir / "results.json").read_bytes() == before
    assert ckpt.stat().st_size < (source / "checkpoints" / "task_2.ckpt").stat().st_size  # not rewritten

    out = finish(fallback)
    assert "task_1.ckpt" in out and "resuming" in out
    assert (fallback_dir / "checkpoints" / "task_2.ckpt.corrupt").exists()
    assert read_results(fallback_dir)["accuracy_matrix"] == read_results(source)["accuracy_matrix"]


def test_atomic_write_leaves_old_file_when_writer_dies(tmp_path):
    """A write that fails half-way leaves the previous complete file and no temp file behind."""
    from cl_inversion.utils.io import _atomic_write, write_json

    path = tmp_path / "results.json"
    write_json(path, {"status": "running"})
    before = path.read_bytes()

    def half_then_crash(handle):
        handle.write(b'{"status": "compl')
        raise OSError("disk full")

    with pytest.raises(OSError):
        _atomic_write(path, half_then_crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_sweep_job_failure_is_recorded_and_other_jobs_run_deterministically(tmp_path):
    """Hydra's basic launcher, `-m`: job 0 fails on bad input; jobs 1 and 2 (same config and seed) still
    run, one after the other in the same process, and give identical results."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "cl_inversion", "-m", "scenario.n_tasks=20,2,2", "method=lwf", "dataset=digits",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none", "seed=7",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # the sweep reports that a job failed...
    assert "scenario.n_tasks=20" in proc.stderr and "Traceback" not in proc.stderr
    failed, first, second = (next(sweep.glob(f"{i}_*")) for i in (0, 1, 2))
    assert read_results(failed)["status"] == "failed" and "scenario.n_tasks=20" in read_results(failed)["error"]
    a, b = read_results(first), read_results(second)  # ...after running the others
    assert a["status"] == b["status"] == "completed" and len(a["accuracy_matrix"]) == 2
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    ca, cb = (torch.load(d / "checkpoints" / "task_1.ckpt", weights_only=False) for d in (first, second))
    assert all(torch.equal(ca["net"][k], cb["net"][k]) for k in ca["net"])


def test_crash_during_synthesis_resumes_after_the_task_training(tmp_path):
    """Killed (Ctrl-C) between task 1's training and its end: the resumed run does not train task 1 again,
    synthesises from the same random state, and ends as an uninterrupted run; metrics.csv keeps its rows."""
    args = ["method=deepinversion", *SMALL_SYNTHESIS, "dataset=digits", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "seed=3", "+callbacks.probe._target_=tests.probe.StateProbe",
            "+callbacks.crash._target_=tests.probe.SynthesisCrash"]
    full = start_cli(*args, run_dir=tmp_path / "full")
    crashed_dir = tmp_path / "crashed"
    crashed = start_cli(*args, run_dir=crashed_dir, extra_env={"CL_TEST_CRASH_AT_TASK": "1"})
    out, _ = crashed.communicate(timeout=300)
    assert crashed.returncode != 0, out[-3000:]
    state = torch.load(crashed_dir / "checkpoints" / "task_1.ckpt", map_location="cpu", weights_only=False)
    assert state["stage"] == "trained" and len(state["callbacks"]["StateProbe"]["draws"]) == 2
    assert read_results(crashed_dir)["tasks_completed"] == 1
    out = finish(start_cli(*args, "resume=true", run_dir=crashed_dir))
    finish(full)
    assert "after the training of task 1" in out
    assert_same_run(tmp_path / "full", crashed_dir)  # 5 draws: task 1 was not fitted again

    def rows(run_dir: Path) -> int:
        return len((run_dir / "logs" / "metrics.csv").read_text().splitlines())

    # nothing lost (Lightning's CSV writer deleted the file on resume); task 1's synthesis ran twice, so its
    # progress rows are there twice
    assert rows(tmp_path / "full") <= rows(crashed_dir) <= rows(tmp_path / "full") + 5


def test_run_dir_holding_a_run_is_refused_unless_overwrite(tmp_path, finished_run):
    source, args = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    def files() -> dict[Path, bytes]:  # Hydra's job log (__main__.log) is appended to by every start
        return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
                if p.is_file() and p.suffix != ".log"}

    before = files()
    fresh = [a for a in args if not a.startswith("scenario.")] + ["scenario.n_tasks=2"]  # another run
    proc = run_cli(*fresh, run_dir=run_dir, check=False, env=env())
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "overwrite=true" in proc.stderr
    assert files() == before  # results, checkpoints and the .hydra record of the original run untouched

    changed = run_cli(*args, "optimizer.lr=0.01", "resume=true", run_dir=run_dir, check=False, env=env())
    assert changed.returncode == 2 and "config differs" in changed.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == before[Path(".hydra/overrides.yaml")]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == before[Path(".hydra/config.yaml")]

    run_cli(*fresh, "overwrite=true", run_dir=run_dir, env=env())
    res = read_results(run_dir)
    assert res["status"] == "completed" and res["n_tasks"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["task_0.ckpt", "task_1.ckpt"]
