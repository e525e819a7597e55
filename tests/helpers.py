"""Helpers the tests share: a run in this process or the CLI in a subprocess, both on the real config tree, and
the run's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"
FAST = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(*overrides: str, run_dir: Path | None = None, check: bool = True, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m cl_inversion <overrides>` in a subprocess; `run_dir` becomes hydra.run.dir."""
    args = [sys.executable, "-m", "cl_inversion", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(args, cwd=REPO, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def run_in_process(*overrides: str, run_dir: Path) -> dict:
    """The experiment `python -m cl_inversion <overrides>` runs, here: `run(compose(overrides))`, for tests whose
    subject is the run rather than the command line (no interpreter start, no Hydra job record); its results.json."""
    from cl_inversion.build import compose
    from cl_inversion.run import run

    run(compose(list(overrides)), run_dir=run_dir)
    return read_results(run_dir)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def student_at_second_task(cls, **kwargs):
    """A method after task 0 of digits (4 classes), at the start of task 1 (2 new classes), the first layer
    nudged so the network differs from its frozen previous copy."""
    import functools

    import torch

    from cl_inversion.data import ClassIncrementalScenario, digits
    from cl_inversion.models import IncrementalClassifier, SmallCNN

    sc = ClassIncrementalScenario(digits(), n_tasks=4, first_task_classes=4)
    torch.manual_seed(0)
    m = cls(IncrementalClassifier(SmallCNN(1, width=8)), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
            **kwargs)
    m.begin_task(0, 4, sc.datamodule(0, 8))
    m.end_task(sc.datamodule(0, 8))
    m.begin_task(1, 2, sc.datamodule(1, 8))
    with torch.no_grad():
        m.net.backbone.stem[0].weight.add_(0.05)
    return m


def small_teacher(seed: int, n_classes: int):
    """A SmallCNN classifier on 1×8×8 inputs with BN running statistics of its own, in eval mode: the teacher
    the synthesis-engine tests invert."""
    import torch

    from cl_inversion.models import IncrementalClassifier, SmallCNN

    torch.manual_seed(seed)
    net = IncrementalClassifier(SmallCNN(1, width=4))
    net.grow(n_classes)
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 1, 8, 8))
    return net.eval()
