"""What the framework costs over a hand-written PyTorch loop, on the same training work.

    python -m benchmarks.loop_overhead [--steps N] [--rounds R] [--quick] [--override trainer.x=y ...]

Both paths train a CIFAR ResNet-32 with the framework's growing head (100 outputs) for N steps of
batch 128 on random 32x32 images (a TensorDataset, no download), SGD lr 0.1, momentum 0.9, wd 2e-4:

(a) framework: a `Finetune` method (a `ContinualModule`) fitted by a Lightning Trainer built as the task
    loop builds it (`cl_inversion.run`): `conf/trainer/cpu.yaml` composed by `run.compose`, instantiated
    with the default logger (csv, `logging_utils.build_logger`) and the run's callbacks. The only
    override is `trainer.max_epochs=1` (the dataset holds exactly N batches). A round is one task:
    Trainer construction + `fit`, so per-task setup is part of the time.
(b) raw: forward, cross-entropy, zero_grad, backward, step, over a DataLoader of the same dataset.

Rounds alternate a, b, a, b, ... after one warm-up round of each, so shared-machine load hits both
alike; the medians are compared. Lightning's `deterministic=True` switches torch's global
deterministic mode on; it is switched back to the process's original setting before every raw round,
so (b) runs as a plain script would. The last line printed is one JSON object:
`{"ratio": framework_s / raw_s, "framework_s": ..., "raw_s": ..., "cpu_ratio": ..., ...}` (`cpu_ratio`: the
same ratio in process CPU time, steadier than wall time on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

BATCH = 128
N_CLASSES = 100


def make_loader(steps: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, N_CLASSES, (steps * BATCH,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def make_net() -> torch.nn.Module:
    from cl_inversion.models import CifarResNet
    from cl_inversion.models.head import IncrementalClassifier

    torch.manual_seed(0)
    net = IncrementalClassifier(CifarResNet(depth=32, in_channels=3))
    net.grow(N_CLASSES)
    return net


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)


class Framework:
    """Path (a): one Trainer per round, built as `cl_inversion.run` builds a task's Trainer."""

    def __init__(self, net: torch.nn.Module, loader: DataLoader, root: Path, overrides: list[str]) -> None:
        from functools import partial

        from cl_inversion.methods import Finetune
        from cl_inversion.run import build_callbacks, compose
        from cl_inversion.utils import logging_utils

        self.cfg = compose(["method=finetune", "trainer.max_epochs=1", *overrides])
        self.method = Finetune(net, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=2e-4))
        self.method.begin_task(0, 0, None)  # the head already has its 100 outputs; task bookkeeping only
        self.method.task_sizes = [N_CLASSES]
        self.callbacks = build_callbacks(self.cfg, self.method)
        self.logger = logging_utils.build_logger(self.cfg, root)
        self.root = root
        self.loader = loader

    def round(self, loader: DataLoader | None = None) -> tuple[float, float]:
        from hydra.utils import instantiate

        began, cpu = time.perf_counter(), time.process_time()
        trainer = instantiate(self.cfg.trainer, logger=self.logger, default_root_dir=str(self.root),
                              callbacks=self.callbacks)
        trainer.fit(self.method, train_dataloaders=loader or self.loader)
        return time.perf_counter() - began, time.process_time() - cpu


class Raw:
    """Path (b): the hand-written loop."""

    def __init__(self, net: torch.nn.Module, loader: DataLoader, deterministic: bool) -> None:
        self.net, self.loader, self.deterministic = net, loader, deterministic
        self.optimizer = make_optimizer(net.parameters())

    def round(self, loader: DataLoader | None = None) -> tuple[float, float]:
        torch.use_deterministic_algorithms(self.deterministic)  # undo Lightning's global switch
        began, cpu = time.perf_counter(), time.process_time()
        self.net.train()
        for x, y in loader or self.loader:
            loss = F.cross_entropy(self.net(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - began, time.process_time() - cpu


def measure(steps: int, rounds: int, warmup_steps: int, overrides: list[str]) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    deterministic = torch.are_deterministic_algorithms_enabled()
    net = make_net()
    loader, warm_loader = make_loader(steps), make_loader(warmup_steps, seed=1)
    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as tmp:
        framework = Framework(net, loader, Path(tmp), overrides)
        raw = Raw(copy.deepcopy(net), loader, deterministic)
        # warm-up: one short round of each (allocator, thread pool, first-call costs)
        framework.round(warm_loader)
        raw.round(warm_loader)
        times: dict[str, list[float]] = {"framework": [], "raw": []}
        cpu: dict[str, list[float]] = {"framework": [], "raw": []}
        for i in range(rounds):
            order = (("framework", framework), ("raw", raw)) if i % 2 == 0 else (("raw", raw), ("framework", framework))
            for name, path in order:
                wall, cpu_s = path.round()
                times[name].append(wall)
                cpu[name].append(cpu_s)
                print(f"round {i + 1}/{rounds} {name:9s} wall {wall:.3f}s cpu {cpu_s:.3f}s", file=sys.stderr,
                      flush=True)
        trainer_cfg = dict(framework.cfg.trainer)
    framework_s, raw_s = statistics.median(times["framework"]), statistics.median(times["raw"])
    framework_cpu, raw_cpu = statistics.median(cpu["framework"]), statistics.median(cpu["raw"])
    return {
        "ratio": round(framework_s / raw_s, 4),
        "framework_s": round(framework_s, 4),
        "raw_s": round(raw_s, 4),
        "cpu_ratio": round(framework_cpu / raw_cpu, 4),  # process CPU time: less sensitive to other load
        "framework_cpu_s": round(framework_cpu, 4),
        "raw_cpu_s": round(raw_cpu, 4),
        "framework_step_ms": round(1000 * framework_s / steps, 2),
        "raw_step_ms": round(1000 * raw_s / steps, 2),
        "steps": steps,
        "rounds": rounds,
        "batch_size": BATCH,
        "framework_rounds_s": [round(t, 4) for t in times["framework"]],
        "raw_rounds_s": [round(t, 4) for t in times["raw"]],
        "load_average": _load_average(),
        "overrides": overrides,
        "trainer": {k: v for k, v in trainer_cfg.items() if k != "_target_"},
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _load_average() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per round (default 30; quick 6)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of each path (default 5; quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (under ~2 minutes on 2 cores)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for the framework's config, e.g. trainer.deterministic=false")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.quick else 30)
    rounds = args.rounds or (3 if args.quick else 5)
    result = measure(steps, rounds, warmup_steps=min(steps, 3), overrides=args.override)
    print(f"framework {result['framework_s']:.3f}s  raw {result['raw_s']:.3f}s  ratio {result['ratio']:.3f} "
          f"({steps} steps x batch {BATCH}, median of {rounds})", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
