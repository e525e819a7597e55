"""Synthesis step time per engine, its options toggled, the compiled step, and what `compile: auto` gives a
CIFAR preset's task boundary.

    python -m benchmarks.synthesis_speed [--quick] [--steps N] [--rounds R] [--batch B] [--threads T]
                                         [--engines E ...] [--compile] [--only ARM ...] [--device cuda]

Teacher: ABD's CIFAR ResNet-32 (31 BN layers) at 32x32 with 10 classes, its BN running statistics set by
a few training-mode passes over random images (no download, no trained weights: time per step does not
depend on them). Engines, each for N steps of batch B per timed run (B: the CIFAR presets' batch, 256 pixel /
128 generator / 256 per_layer, unless given):

* pixel     — `PixelInversion._run` (DeepInversion: CE + BN norm distance + TV, Adam on the images);
* generator — `GeneratorInversion._train` (ABD: content + diversity + BN KL + smoothness, Adam on G);
* per_layer — `PerLayerInversion.invert_full` (PMI's full-model phase; its per-layer phase is per block).

Arms per engine, interleaved round by round in one process (shared-machine load hits all alike), the
median of R rounds kept; ratios are arm / `eager` (below 1: faster):

* `eager`      — the step uncompiled (`compile: false`: every engine's step before `compile: auto`);
* `before`     — the step as it was before the fast path: two-pass BN variance (`x.var(unbiased=False)`)
                 and one host read of the loss every step (the old NaN guard), patched into the same code;
* `channels_last`, `bf16-mixed` — the option switched on (pixel and generator; bf16 for per_layer);
* on CUDA: `graphed` (`cuda_graph: true`: the whole step captured and replayed, graphing.py; its 3 warm-up
  steps and the capture are inside each timed run, so use N in the hundreds there), and for pixel and
  generator `graphed+bf16-mixed`;
* with `--compile`: `compiled` (`compile: true`), for the generator also `compiled+channels_last`, and on
  CUDA `compiled+graphed` and `inductor-graphs` (`compile_mode: reduce-overhead`: Inductor's own CUDA graphs
  around the compiled regions only). Compiling is timed apart, cold: each compiled arm first compiles in a
  fresh Inductor cache (`compile_s`: its first run less N compiled steps).

`auto` is not a separate code path: it is the arm the defaults pick for the preset's planned boundary
(`PRESETS`: steps and batch of the CIFAR presets' defaults): on a CPU `compiled` or `eager`, as the rule in
`inversion/compiling.py` decides; on CUDA `compiled+graphed` or `graphed` (`cuda_graph: auto` captures every
long phase). Each engine's `boundary` reports the boundary's time by arm, step times scaled linearly from B to
the preset's batch: `eager_s`, `auto_first_s` (compile included: the first boundary) and `auto_later_s` (later
boundaries reuse the compiled graph: no compile), their ratios to eager, and the break-even the measurement
implies.

The last line printed is one JSON object:
`{"engines": {"pixel": {"ms_per_step": ..., "images_per_s": ..., "options": {"before": r, ...}, "boundary": ...},
...}, "threads": T, "steps": N, "batch": {...}, "rounds": R, "device": "cpu" or the GPU's name}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cl_inversion.inversion import GeneratorInversion, PerLayerInversion, PixelInversion, common
from cl_inversion.inversion.common import BNStatistics, SynthesisProgress, frozen_eval
from cl_inversion.inversion.compiling import compile_pays, compiled_teacher, planned_flop

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
    engine = PixelInversion(steps=steps, batch_size=batch, progress=False, **{"cuda_graph": False, **options})
    engine.setup(SHAPE, PIXEL_RANGE)
    engine.graphed = engine.cuda_graph is True
    targets = torch.arange(N_CLASSES).repeat(batch // N_CLASSES + 1)[:batch].to(device_of(teacher))

    def run() -> None:
        with frozen_eval(teacher), BNStatistics(teacher) as bn, common.memory_format(teacher, engine.channels_last):
            model = compiled_teacher(teacher, engine.compile is True, engine.compile_mode)
            engine._run(model, bn, targets, engine.lr, 0)

    return run


def generator_runner(teacher: nn.Module, steps: int, batch: int, **options: Any) -> Callable[[], None]:
    engine = GeneratorInversion(steps=steps, batch_size=batch, progress=False, **{"cuda_graph": False, **options})
    engine.setup(SHAPE, PIXEL_RANGE)
    engine._fresh_generator(device_of(teacher), engine.lr)

    def run() -> None:
        engine._train(teacher, N_CLASSES)

    return run


def per_layer_runner(teacher: nn.Module, steps: int, batch: int, **options: Any) -> Callable[[], None]:
    engine = PerLayerInversion(layer_steps=0, full_steps=steps, batch_size=batch, progress=False,
                               **{"cuda_graph": False, **options})
    engine.setup(SHAPE, PIXEL_RANGE)
    engine.compile_now, engine.graphs_now = engine.compile is True, engine.cuda_graph is True
    dim = teacher.backbone.feature_dim
    device = device_of(teacher)
    labels = torch.arange(N_CLASSES, device=device).repeat(batch // N_CLASSES + 1)[:batch]
    start, features = torch.randn(batch, *SHAPE, device=device), torch.randn(batch, dim, device=device)

    def run() -> None:
        with frozen_eval(teacher):
            engine.invert_full(teacher, start.clone(), features, labels)

    return run


ENGINES = {
    "pixel": (pixel_runner, ["channels_last", "bf16-mixed"], ["compiled", "inductor-graphs"]),
    "generator": (generator_runner, ["channels_last", "bf16-mixed"],
                  ["compiled", "compiled+channels_last", "inductor-graphs"]),
    "per_layer": (per_layer_runner, ["bf16-mixed"], ["compiled", "inductor-graphs"]),
}
#: CUDA only, for the engines with a `cuda_graph` setting: the whole step captured (graphing.py)
GRAPHED_ARMS = {"pixel": ["graphed", "compiled+graphed", "graphed+bf16-mixed"],
                "generator": ["graphed", "compiled+graphed", "graphed+bf16-mixed"],
                "per_layer": ["graphed", "compiled+graphed"]}
ARM_OPTIONS = {"eager": {}, "before": {}, "channels_last": {"channels_last": True},
               "bf16-mixed": {"precision": "bf16-mixed"}, "compiled": {"compile": True},
               "compiled+channels_last": {"compile": True, "channels_last": True},
               "inductor-graphs": {"compile": True, "compile_mode": "reduce-overhead"},
               "graphed": {"cuda_graph": True}, "compiled+graphed": {"compile": True, "cuda_graph": True},
               "graphed+bf16-mixed": {"cuda_graph": True, "precision": "bf16-mixed"}}

#: a task boundary of each engine at the CIFAR presets' defaults: planned steps and batch
#: (pixel: engine defaults, 2000 steps for each of 2560 / 256 = 10 batches; generator: `abd_cifar100_10t`;
#: per_layer: `pmi_cifar100_10t`'s full-model phase, 160 steps of its first pool of 3000)
PRESETS = {"pixel": {"steps": 20000, "batch": 256}, "generator": {"steps": 10000, "batch": 128},
           "per_layer": {"steps": 160, "batch": 3000}}
BENCH_BATCH = {"pixel": 256, "generator": 128, "per_layer": 256}


def step_flops(engine: str, teacher: nn.Module, device: torch.device) -> float:
    """Forward FLOPs per sample of the engine's step (what `compile: auto` weighs)."""
    instance = {"pixel": PixelInversion, "generator": GeneratorInversion, "per_layer": PerLayerInversion}[engine]()
    instance.setup(SHAPE, PIXEL_RANGE)
    if engine == "generator":
        instance._fresh_generator(device, instance.lr)
    return instance.step_flops(teacher)


def boundary(engine: str, ms: dict[str, float], compile_s: dict[str, float], batch: int, flops: float,
             device: torch.device) -> dict[str, Any]:
    """The preset's boundary by arm (seconds), step times scaled from `batch` to the preset's batch: `eager`
    against what the defaults run (`auto_arm`: on CUDA the captured step, compiled where `compile: auto` says)."""
    plan = PRESETS[engine]
    scale = plan["batch"] / batch
    eager = plan["steps"] * ms["eager"] * scale / 1000
    auto = compile_pays(plan["steps"], plan["batch"], flops, device)
    graphs = bool(GRAPHED_ARMS[engine]) and device.type == "cuda"  # `cuda_graph: auto` on CUDA
    compiled_arm, eager_arm = ("compiled+graphed", "graphed") if graphs else ("compiled", "eager")
    out: dict[str, Any] = {**plan, "auto_compiles": auto, "auto_arm": compiled_arm if auto else eager_arm,
                           "eager_s": round(eager, 1)}
    if compiled_arm not in ms or eager_arm not in ms or compile_s.get(compiled_arm) is None:
        return out
    compiled = plan["steps"] * ms[compiled_arm] * scale / 1000
    uncompiled = plan["steps"] * ms[eager_arm] * scale / 1000
    first, later = (compiled + compile_s[compiled_arm], compiled) if auto else (uncompiled, uncompiled)
    saved = ms["eager"] - ms.get("compiled", ms["eager"])  # the CPU rule's break-even: compiled against eager
    saved_per_flop = saved / 1000 / planned_flop(1, batch, flops)
    out.update(auto_first_s=round(first, 1), auto_later_s=round(later, 1), auto_first_ratio=round(first / eager, 4),
               auto_later_ratio=round(later / eager, 4),
               break_even_flop=float(f"{compile_s['compiled'] / saved_per_flop:.3g}") if saved_per_flop > 0 else None)
    return out


def cold_compile_seconds(run: Callable[[], None], device: torch.device) -> float:
    """A compiled arm's first run in a fresh Inductor cache and Dynamo state: compiling plus its N steps."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    torch.compiler.reset()
    synchronize(device)
    began = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - began


def arms_of(engines: list[str], compile_arms: bool, only: list[str] | None,
            device: torch.device) -> list[tuple[str, str]]:
    wanted = (lambda arm: True) if only is None else (lambda arm: arm in only)
    arms = []
    for name in engines:
        _, options, compiled = ENGINES[name]
        arms.append((name, "eager"))
        arms += [(name, arm) for arm in ["before", *options] if wanted(arm)]
        cuda = device.type == "cuda"
        if cuda:
            arms += [(name, arm) for arm in GRAPHED_ARMS[name]
                     if wanted(arm) and (compile_arms or "compiled" not in arm)]
        if compile_arms:
            arms += [(name, arm) for arm in compiled if wanted(arm) and (arm != "inductor-graphs" or cuda)]
    return arms


def measure(engines: list[str], steps: int, batch: int | None, rounds: int, compile_arms: bool = False,
            only: list[str] | None = None, device: torch.device = CPU) -> dict[str, Any]:
    """Time every arm (`only`: just these besides `eager`) of every engine, interleaved round by round."""
    teacher = make_teacher(device)
    batches = {name: batch or BENCH_BATCH[name] for name in engines}
    arms = arms_of(engines, compile_arms, only, device)
    runs = {(e, a): ENGINES[e][0](teacher, steps, batches[e], **{"compile": False, **ARM_OPTIONS[a]}) for e, a in arms}
    first_runs = {key: cold_compile_seconds(runs[key], device) for key in runs if "compile" in ARM_OPTIONS[key[1]]}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for r in range(rounds + 1):  # round 0 warms up every arm (allocator, oneDNN kernels, compiled graphs)
        for (engine, arm), run in runs.items():
            with before_fast_path() if arm == "before" else contextlib.nullcontext():
                synchronize(device)
                began = time.perf_counter()
                run()
                synchronize(device)
                elapsed = time.perf_counter() - began
            if r:
                times[engine, arm].append(elapsed / steps)
        print(f"[synthesis_speed] round {r}/{rounds} done", file=sys.stderr, flush=True)
    result: dict[str, Any] = {}
    for engine in engines:
        ms = {arm: 1000 * statistics.median(t) for (e, arm), t in times.items() if e == engine}
        compile_s = {arm: round(first_runs[engine, arm] - steps * ms[arm] / 1000, 1)
                     for (e, arm) in first_runs if e == engine}
        result[engine] = {"ms_per_step": round(ms["eager"], 2),
                          "images_per_s": round(1000 * batches[engine] / ms["eager"], 1), "batch": batches[engine],
                          "options": {arm: round(v / ms["eager"], 4) for arm, v in ms.items() if arm != "eager"},
                          "ms_per_step_by_arm": {arm: round(v, 2) for arm, v in ms.items()}, "compile_s": compile_s,
                          "boundary": boundary(engine, ms, compile_s, batches[engine],
                                               step_flops(engine, teacher, device), device)}
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
                        help="add the compiled arms (on CUDA also compiled+graphed, inductor-graphs): minutes on a CPU")
    parser.add_argument("--only", nargs="*", default=None, metavar="ARM",
                        help="time only these arms besides eager (before, channels_last, bf16-mixed, compiled, "
                             "compiled+channels_last; on CUDA graphed, graphed+bf16-mixed, compiled+graphed, "
                             "inductor-graphs)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the teacher and every engine there)")
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 20)
    rounds = args.rounds or (3 if args.quick else 7)
    batch = args.batch or (64 if args.quick else None)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engines = measure(args.engines, steps, batch, rounds, args.compile, args.only, device)
    out = {"engines": engines, "threads": args.threads, "steps": steps,
           "batch": {name: engine["batch"] for name, engine in engines.items()}, "rounds": rounds,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
