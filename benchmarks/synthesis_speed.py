"""Synthesis step time per engine, its options toggled, and the step as it was before the fast path.

    python -m benchmarks.synthesis_speed [--quick] [--steps N] [--rounds R] [--batch B] [--threads T]
                                         [--engines E ...] [--compile] [--only ARM ...] [--device cuda]

Teacher: ABD's CIFAR ResNet-32 (31 BN layers) at 32x32 with 10 classes, its BN running statistics set by
a few training-mode passes over random images (no download, no trained weights: time per step does not
depend on them). Engines, each for N steps of batch B per timed run:

* pixel     — `PixelInversion._run` (DeepInversion: CE + BN norm distance + TV, Adam on the images);
* generator — `GeneratorInversion._train` (ABD: content + diversity + BN KL + smoothness, Adam on G);
* per_layer — `PerLayerInversion.invert_full` (PMI's full-model phase; its per-layer phase is per block).

Arms per engine, interleaved round by round in one process (shared-machine load hits all alike), the
median of R rounds kept:

* `default`    — the engine as configured by `conf/inversion/default.yaml`;
* `before`     — the step as it was before the fast path: two-pass BN variance
                 (`x.var(unbiased=False)`) and one host read of the loss every step (the old NaN guard),
                 patched into the same engine code; its ratio is before / default;
* `channels_last`, `bf16-mixed` — the option switched on (pixel and generator; bf16 for per_layer), the
                 ratio option / default (below 1: faster);
* `compile` (with `--compile`) — `compile: true` (pixel, generator), and for the generator also
                 `compile+channels_last`; each one's first round, which compiles, is reported apart as
                 `<arm>_warmup_s`.

The last line printed is one JSON object:
`{"engines": {"pixel": {"ms_per_step": ..., "images_per_s": ..., "options": {"before": r, ...}}, ...},
"threads": T, "steps": N, "batch": B, "rounds": R, "device": "cpu" or the GPU's name}`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cl_inversion.inversion import GeneratorInversion, PerLayerInversion, PixelInversion, common
from cl_inversion.inversion.common import BNStatistics, SynthesisProgress, frozen_eval

N_CLASSES = 10
SHAPE = (3, 32, 32)
CPU = torch.device("cpu")
PIXEL_RANGE = (torch.full((3, 1, 1), -2.0), torch.full((3, 1, 1), 2.0))


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a GPU step's time is only known after them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_teacher(device: torch.device = CPU) -> nn.Module:
    from cl_inversion.models import CifarResNet, IncrementalClassifier

    torch.manual_seed(0)
    net = IncrementalClassifier(CifarResNet(32, in_channels=3, variant="abd"))
    net.grow(N_CLASSES)
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(64, *SHAPE) * 0.8 + 0.1)
    return net.eval().to(device)


def two_pass_moments(x: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


@contextlib.contextmanager
def before_fast_path() -> Iterator[None]:
    """The engines' step before the fast path: two-pass variance, the loss read on the host every step."""
    moments, update = common.batch_moments, SynthesisProgress.update

    def reading_update(self, terms, loss=None):
        if loss is not None:
            float(loss.detach())  # the old `check_finite`: `torch.isfinite(loss)` in an `if`, every step
        return update(self, terms, loss)

    common.batch_moments, SynthesisProgress.update = two_pass_moments, reading_update
    try:
        yield
    finally:
        common.batch_moments, SynthesisProgress.update = moments, update


def pixel_runner(teacher: nn.Module, steps: int, batch: int, **options: Any) -> Callable[[], None]:
    engine = PixelInversion(steps=steps, batch_size=batch, progress=False, **options)
    engine.setup(SHAPE, PIXEL_RANGE)
    targets = torch.arange(N_CLASSES).repeat(batch // N_CLASSES + 1)[:batch].to(device_of(teacher))

    def run() -> None:
        with frozen_eval(teacher), BNStatistics(teacher) as bn, common.memory_format(teacher, engine.channels_last):
            engine._run(teacher, bn, targets, engine.lr, 0)

    return run


def compiled_pixel_runner(teacher: nn.Module, steps: int, batch: int) -> Callable[[], None]:
    """The pixel step with `compile: true`: hooks and the compiled teacher kept across rounds (a synthesis
    compiles once per teacher; re-registering hooks each round would recompile every round)."""
    teacher = copy.deepcopy(teacher).requires_grad_(False)
    engine = PixelInversion(steps=steps, batch_size=batch, progress=False, compile=True)
    engine.setup(SHAPE, PIXEL_RANGE)
    targets = torch.arange(N_CLASSES).repeat(batch // N_CLASSES + 1)[:batch].to(device_of(teacher))
    bn = BNStatistics(teacher)
    model = common.compiled(teacher, True)

    def run() -> None:
        engine._run(model, bn, targets, engine.lr, 0)

    return run


def compiled_generator_runner(teacher: nn.Module, steps: int, batch: int,
                              channels_last: bool = False) -> Callable[[], None]:
    """The generator step with `compile: true` (`GeneratorInversion._train`'s loop: teacher and generator
    compiled, hooks kept across rounds), optionally both in channels-last layout."""
    teacher = copy.deepcopy(teacher).requires_grad_(False)
    engine = GeneratorInversion(steps=steps, batch_size=batch, progress=False, compile=True)
    engine.setup(SHAPE, PIXEL_RANGE)
    device = device_of(teacher)
    engine._fresh_generator(device, engine.lr)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        engine.generator.to(memory_format=torch.channels_last)
    bn = BNStatistics(teacher)
    model, sampler = common.compiled(teacher, True), common.compiled(engine.generator, True)

    def run() -> None:
        for _ in range(steps):
            images = sampler(torch.randn(batch, engine.generator.z_dim, device=device))
            loss = engine.loss_terms(model, bn, images, N_CLASSES)["loss"]
            engine.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            engine.optimizer.step()

    return run


def generator_runner(teacher: nn.Module, steps: int, batch: int, **options: Any) -> Callable[[], None]:
    engine = GeneratorInversion(steps=steps, batch_size=batch, progress=False, **options)
    engine.setup(SHAPE, PIXEL_RANGE)
    engine._fresh_generator(device_of(teacher), engine.lr)

    def run() -> None:
        engine._train(teacher, N_CLASSES)

    return run


def per_layer_runner(teacher: nn.Module, steps: int, batch: int, **options: Any) -> Callable[[], None]:
    engine = PerLayerInversion(layer_steps=0, full_steps=steps, batch_size=batch, progress=False, **options)
    engine.setup(SHAPE, PIXEL_RANGE)
    dim = teacher.backbone.feature_dim
    device = device_of(teacher)
    labels = torch.arange(N_CLASSES, device=device).repeat(batch // N_CLASSES + 1)[:batch]
    start, features = torch.randn(batch, *SHAPE, device=device), torch.randn(batch, dim, device=device)

    def run() -> None:
        with frozen_eval(teacher):
            engine.invert_full(teacher, start.clone(), features, labels)

    return run


ENGINES = {
    "pixel": (pixel_runner, ["channels_last", "bf16-mixed"]),
    "generator": (generator_runner, ["channels_last", "bf16-mixed"]),
    "per_layer": (per_layer_runner, ["bf16-mixed"]),
}


def option_kwargs(option: str) -> dict[str, Any]:
    if option == "channels_last":
        return {"channels_last": True}
    if option == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    return {}


COMPILED = {"pixel": {"compile": compiled_pixel_runner},
            "generator": {"compile": compiled_generator_runner,
                          "compile+channels_last": lambda t, s, b: compiled_generator_runner(t, s, b, True)}}


def measure(engines: list[str], steps: int, batch: int, rounds: int, compile_arms: bool = False,
            only: list[str] | None = None, device: torch.device = CPU) -> dict[str, Any]:
    """Time every arm (`only`: just these besides `default`) of every engine, interleaved round by round."""
    teacher = make_teacher(device)
    wanted = (lambda arm: True) if only is None else (lambda arm: arm in only)
    arms: list[tuple[str, str, Callable[[], None], bool]] = []
    for name in engines:
        make, options = ENGINES[name]
        arms.append((name, "default", make(teacher, steps, batch), False))
        if wanted("before"):
            arms.append((name, "before", make(teacher, steps, batch), True))
        for option in filter(wanted, options):
            arms.append((name, option, make(teacher, steps, batch, **option_kwargs(option)), False))
        if compile_arms:
            for arm, make_compiled in COMPILED.get(name, {}).items():
                arms.append((name, arm, make_compiled(teacher, steps, batch), False))
    warmup: dict[tuple[str, str], float] = {}
    times: dict[tuple[str, str], list[float]] = {(e, a): [] for e, a, _, _ in arms}
    for r in range(rounds + 1):  # round 0 warms up every arm (allocator, oneDNN kernels)
        for engine, arm, run, before in arms:
            with before_fast_path() if before else contextlib.nullcontext():
                synchronize(device)
                began = time.perf_counter()
                run()
                synchronize(device)
                elapsed = time.perf_counter() - began
            if r:
                times[engine, arm].append(elapsed / steps)
            else:
                warmup[engine, arm] = elapsed
        print(f"[synthesis_speed] round {r}/{rounds} done", file=sys.stderr, flush=True)
    result: dict[str, Any] = {}
    for engine in engines:
        default = statistics.median(times[engine, "default"])
        options = {arm: round(statistics.median(t) / default, 4) for (e, arm), t in times.items()
                   if e == engine and arm != "default"}
        result[engine] = {"ms_per_step": round(1000 * default, 2), "images_per_s": round(batch / default, 1),
                          "options": options,
                          "ms_per_step_by_arm": {arm: round(1000 * statistics.median(t), 2)
                                                 for (e, arm), t in times.items() if e == engine}}
        for arm in COMPILED.get(engine, {}):  # the first round of a compiled arm includes compiling
            if (engine, arm) in warmup:
                result[engine][f"{arm}_warmup_s"] = round(warmup[engine, arm], 1)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64, 5 steps, 3 rounds (a few minutes on 2 cores)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--compile", action="store_true",
                        help="add the compile option's arm (pixel, generator): minutes of compiling on a CPU")
    parser.add_argument("--only", nargs="*", default=None, metavar="ARM",
                        help="time only these arms besides default (before, channels_last, bf16-mixed)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the teacher and every engine there)")
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 20)
    rounds = args.rounds or (3 if args.quick else 7)
    batch = args.batch or (64 if args.quick else 256)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engines = measure(args.engines, steps, batch, rounds, args.compile, args.only, device)
    out = {"engines": engines, "threads": args.threads, "steps": steps, "batch": batch, "rounds": rounds,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
