"""Intra-op threads per job: the `threads` key, then OMP_NUM_THREADS, SLURM's allocation, the cores split
among a local multirun's jobs, the CPU affinity; recorded in results.json."""

import pytest
import torch
from helpers import run_in_process

from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.threads import available_cores, job_threads, set_job_threads
from hydra_plugins.cl_inversion_launcher import CONCURRENT_JOBS_ENV

ENV = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", CONCURRENT_JOBS_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_threads_come_from_the_key_then_the_environment_then_the_cores(clean_env):
    cores = available_cores()
    assert job_threads(None) == (cores, "CPU affinity")
    clean_env.setenv(CONCURRENT_JOBS_ENV, "4")
    assert job_threads(None) == (max(1, cores // 4), f"{cores} cores / 4 local jobs")
    clean_env.setenv("SLURM_CPUS_PER_TASK", "6")
    assert job_threads(None) == (6, "SLURM_CPUS_PER_TASK")
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert job_threads(None) == (3, "OMP_NUM_THREADS")
    assert job_threads(2) == (2, "threads")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="threads="):
            job_threads(bad)
    before = torch.get_num_threads()
    try:
        assert set_job_threads(1) == (1, "threads") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_run_records_its_threads_and_rejects_a_bad_count(tmp_path, clean_env):
    base = ["method=finetune", "scenario.n_tasks=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "logger=none"]
    clean_env.setenv("SLURM_CPUS_PER_TASK", "1")
    before = torch.get_num_threads()
    try:
        assert run_in_process(*base, run_dir=tmp_path / "slurm")["threads"] == 1
        with pytest.raises(ConfigError, match="threads=0 must be an integer >= 1"):
            run_in_process(*base, "threads=0", run_dir=tmp_path / "bad")
    finally:
        torch.set_num_threads(before)
