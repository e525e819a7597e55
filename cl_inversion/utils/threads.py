"""Intra-op threads for one job, from what the job was given (oversubscribed OpenMP threads spin)."""

from __future__ import annotations

import os

import torch

from cl_inversion.utils.errors import ConfigError
from hydra_plugins.cl_inversion_launcher import CONCURRENT_JOBS_ENV


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the process's CPU affinity (cgroups, taskset, SLURM binding)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_threads(requested: int | None) -> tuple[int, str]:
    """(threads, where the number came from), in this order: the `threads` key, `OMP_NUM_THREADS`,
    SLURM's `SLURM_CPUS_PER_TASK`, the cores divided among the jobs of a local multirun, the CPU affinity."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"threads={requested!r} must be an integer >= 1 or null (from the job's CPU allocation)")
        return requested, "threads"
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value), name
    cores = available_cores()
    jobs = os.environ.get(CONCURRENT_JOBS_ENV, "").strip()
    if jobs.isdigit() and int(jobs) > 1:
        return max(1, cores // int(jobs)), f"{cores} cores / {jobs} local jobs"
    return cores, "CPU affinity"


def set_job_threads(requested: int | None) -> tuple[int, str]:
    threads, source = job_threads(requested)
    torch.set_num_threads(threads)
    return threads, source
