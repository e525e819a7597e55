"""Fixtures: the CLI in a subprocess and Hydra composition, both on the real config tree (helpers.py)."""

from __future__ import annotations

import pytest
from helpers import run_cli


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def compose():
    from cl_inversion.run import compose as _compose

    return _compose
