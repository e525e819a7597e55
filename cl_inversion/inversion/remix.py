"""REMIX (Krukowski et al., arXiv 2605.11804): PMI's per-layer engine with a Laplace-kernel covariance NLL per
BatchNorm layer in both phases (`per_layer.py` `laplace_weight`, `covariance.py`).

Reference: pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at f2cb098, `resnet32/` — a fork of PMI's code
whose student and feature model keep PMI's lines (the runner's loss lines, the CFS compensation, the pool
sampling read alike); `alpha_frob` is 0.5 in its 10- and 20-task scripts, 0.05 in the 5-task one.
"""

from __future__ import annotations

from typing import Any

from cl_inversion.inversion.per_layer import PerLayerInversion


class RemixInversion(PerLayerInversion):
    """Synthesis engine: PMI's, with REMIX's covariance term on (`laplace_weight` = `alpha_frob`)."""

    name = "remix"

    def __init__(self, *args: Any, laplace_weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, laplace_weight=laplace_weight, **kwargs)
