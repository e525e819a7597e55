"""The code, tests, benchmarks and the analysis scripts under docs/ are ruff-clean (the rules in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

LINTED = ("cl_inversion", "tests", "benchmarks", "docs/experiments/analysis")


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", *LINTED], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
