"""The `cl-inversion` console script from any directory (editable install and a built wheel), and the
one-line error for a SLURM sweep on a machine without SLURM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli_env

from cl_inversion.cli import entry

TINY_RUN = ["method=finetune", "scenario.n_tasks=2", "trainer.max_epochs=1", "logger=none",
            "trainer.enable_progress_bar=false"]


def clean_env(**extra: str) -> dict[str, str]:
    env = cli_env()
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


# --- where the config tree is ---------------------------------------------------------------------------

def test_config_dir_is_the_checkouts_conf():
    assert entry.config_dir() == REPO / "conf"
    assert entry.config_dir().is_absolute()


def test_every_conf_file_is_shipped_as_data_files():
    """pyproject's data-files list one entry per folder (they do not recurse): a new conf/ folder needs one."""
    tomllib = pytest.importorskip("tomllib")
    from glob import glob

    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = set()
    for dest, patterns in data_files.items():
        for pattern in patterns:
            for file in glob(str(REPO / pattern)):
                shipped.add(Path(dest, Path(file).name).as_posix())
    expected = {(entry.INSTALLED_CONFIG_DIR / f.relative_to(REPO / "conf")).as_posix()
                for f in (REPO / "conf").rglob("*.yaml")}
    assert expected - shipped == set(), "add these conf/ folders to [tool.setuptools.data-files]"


def test_editable_console_script_help_from_another_directory(tmp_path):
    script = Path(sys.executable).parent / "cl-inversion"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (pip install -e . creates it)")
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_no_traceback(proc)
    assert "method:" in proc.stdout and "finetune" in proc.stdout  # the config groups were found


SKIP_IN_COPY = {".git", ".venv", "outputs", "multirun", "wandb", "lightning_logs", "build", "dist", "benchmarks",
                "docs", "tests", ".pytest_cache", ".ruff_cache"}


def _copy_sources(dest: Path) -> Path:
    """The checkout without its run outputs and caches, to build the wheel outside it (an in-tree build writes
    build/ and egg-info there). Whatever pyproject packages (cl_inversion, hydra_plugins, ...) comes along."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dest.mkdir()
    for item in REPO.iterdir():
        if item.name in SKIP_IN_COPY or item.name.endswith(".egg-info"):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(item, dest / item.name)
    return dest


@pytest.mark.slow  # builds a wheel and a venv (~15-25 s)
def test_wheel_console_script_runs_from_any_directory(tmp_path):
    src = _copy_sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    pip_env = clean_env(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(src)], cwd=tmp_path, env=pip_env, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("cl_inversion-*.whl")

    # A fresh venv that sees the project's dependencies (this interpreter's site-packages, through a .pth
    # line: .pth files there, such as the editable install's finder, are not processed) but not the checkout.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "_cl_inversion_test_deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps",
                              "--no-index", str(wheel)], cwd=tmp_path, env=pip_env, capture_output=True,
                             text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    where = subprocess.run([str(vpy), "-c", "import cl_inversion, cl_inversion.cli.entry as e; "
                            "print(cl_inversion.__file__); print(e.config_dir())"],
                           cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, config = where.stdout.split()
    assert Path(package_file).resolve().is_relative_to(venv.resolve())  # the wheel, not the checkout
    assert Path(config) == (venv / entry.INSTALLED_CONFIG_DIR).resolve()

    script = venv / "bin" / "cl-inversion"
    work = tmp_path / "elsewhere"
    work.mkdir()
    help_proc = subprocess.run([str(script), "--help"], cwd=work, env=clean_env(), capture_output=True, text=True,
                               timeout=300)
    assert help_proc.returncode == 0, help_proc.stderr[-3000:]
    assert_no_traceback(help_proc)

    run_dir = tmp_path / "run"
    run = subprocess.run([str(script), *TINY_RUN, f"hydra.run.dir={run_dir}"], cwd=work, env=clean_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2


# --- a SLURM sweep without SLURM ------------------------------------------------------------------------

def test_slurm_sweep_without_slurm_is_one_error_line(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    proc = subprocess.run([sys.executable, "-m", "cl_inversion", "-m", "hydra/launcher=slurm", "method=finetune"],
                          cwd=tmp_path, env=clean_env(PATH=str(empty_bin)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert_no_traceback(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cl-inversion: error:")
    assert "SLURM was not found" in lines[0] and "sbatch" in lines[0] and "hydra/launcher=local" in lines[0]
    assert not (tmp_path / "multirun").exists()  # nothing was launched


@pytest.mark.parametrize("argv, expected", [
    (["-m", "hydra/launcher=slurm"], True),
    (["--multirun", "hydra/launcher=submitit_slurm", "seed=0,1"], True),
    (["hydra/launcher=slurm", "hydra.mode=MULTIRUN"], True),
    (["hydra/launcher=slurm"], False),  # no -m: Hydra runs the job here, the launcher is never used
    (["-m", "hydra/launcher=local"], False),
    (["-m", "hydra/launcher=slurm", "hydra/launcher=local"], False),  # the last choice wins
    (["-m", "method=finetune"], False),
])
def test_slurm_check_only_for_a_slurm_sweep(monkeypatch, argv, expected):
    monkeypatch.setattr(entry.shutil, "which", lambda cmd: None)
    assert (entry.slurm_missing_message(argv) is not None) is expected


def test_slurm_check_passes_where_slurm_is_installed(monkeypatch):
    monkeypatch.setattr(entry.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    assert entry.slurm_missing_message(["-m", "hydra/launcher=slurm"]) is None
