"""Every method's accuracy matrices on digits (seed 0, a small budget, one thread) equal the ones pinned in
tests/data/pinned_digits.json: a refactor that changes any loss, RNG draw or order of operations shows here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_inversion.run import compose, run

PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned_digits.json").read_text())
TOLERANCE = 1e-6  # percent; the same thread count gives the same arithmetic


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(PINNED["matrices"]))
def test_accuracy_matrices_match_the_pinned_ones(method, tmp_path):
    results = run(compose([f"method={method}", *PINNED["overrides"]]), run_dir=tmp_path)
    for key in ("accuracy_matrix", "task_aware_matrix"):
        expected, got = PINNED["matrices"][method][key], results[key]
        assert [len(r) for r in got] == [len(r) for r in expected]
        assert all(abs(a - b) <= TOLERANCE for ra, rb in zip(got, expected) for a, b in zip(ra, rb)), \
            f"{method} {key}: {got} != pinned {expected}"
