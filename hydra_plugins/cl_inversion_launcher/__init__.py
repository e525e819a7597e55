"""Hydra's submitit local launcher, telling every job how many jobs share this machine (a Hydra plugin:
Hydra accepts launchers only from the `hydra_plugins` namespace).

submitit's local executor starts all jobs of a sweep at once; each job's torch would otherwise take every
core, and OpenMP threads spin when cores are oversubscribed (a digits run went ~30x slower beside one
busy process). The count lets `threads.job_threads` divide the cores among the jobs."""

from __future__ import annotations

import os
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as SubmititLocalLauncher

CONCURRENT_JOBS_ENV = "CL_INVERSION_LOCAL_JOBS"


class LocalLauncher(SubmititLocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        previous = os.environ.get(CONCURRENT_JOBS_ENV)
        os.environ[CONCURRENT_JOBS_ENV] = str(len(job_overrides))  # submitit copies the environment per job
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            if previous is None:
                os.environ.pop(CONCURRENT_JOBS_ENV, None)
            else:
                os.environ[CONCURRENT_JOBS_ENV] = previous
