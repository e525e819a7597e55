"""`torch.compile` for synthesis: when it pays (`compile: auto`), and compiled graphs reused across boundaries.

Compiling costs a fixed time (tens of seconds to minutes on a CPU, half a minute on a GPU) and then saves a
share of every step, so it pays only for long syntheses. `compile: auto`, every engine's default, compiles
when a boundary's planned work passes the break-even measured for the device (docs/experiments/synthesis_speed.md,
"compile: auto"):

* CPU: the planned arithmetic, `3 × steps × batch × forward FLOPs per sample` (forward + backward of what a
  step runs: the teacher, and the generator where there is one), at least `CPU_BREAK_EVEN_FLOP`;
* CUDA: the planned steps at least `CUDA_BREAK_EVEN_STEPS` (there the step is bound by kernel launches, not
  arithmetic, so the saving per step hardly depends on the batch);
* other devices: never.

The rule reads only the configuration and the network's shape — never a clock — so the same config gives the
same choice, and the same images, on every run.

A classifier teacher (`IncrementalClassifier`) is compiled without its head: the head grows every task, the
backbone does not, and Dynamo keys compiled code on the backbone's `forward`, so every later teacher of the
same architecture (its weights and BN hooks new) runs the graph compiled at the first boundary, with no
recompile (tested). The head, one linear layer, runs eagerly.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cl_inversion.models.head import IncrementalClassifier
from cl_inversion.utils.errors import ConfigError

#: `compile: auto` on a CPU: compile when a boundary plans at least this many FLOPs (forward + backward).
#: The break-even measured on one thread (ResNet-32, cold compile, two runs; docs/experiments/synthesis_speed.md)
#: was 0.8-1.0e13 FLOP (per-layer), 1.3-1.9e13 (pixel) and 1.9-2.8e13 (generator); 5e13 is above all of them,
#: so that `auto` compiles only where it clearly pays.
CPU_BREAK_EVEN_FLOP = 5e13
#: `compile: auto` on CUDA: compile when a boundary plans at least this many steps. Measured on an H200
#: (docs/gpu.md): 31.9 s to compile the generator step, 11.1 ms saved per step at batch 256 → 2 900 steps.
CUDA_BREAK_EVEN_STEPS = 3000
#: torch.compile modes an engine accepts (`reduce-overhead`: CUDA graphs on a GPU; on a CPU the same as `default`)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(value: bool | str, mode: str, engine: str) -> bool | str:
    """The engine's `compile` setting, validated: true, false or auto; `compile_mode` one of COMPILE_MODES."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"inversion.{engine}.compile_mode={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(f"inversion.{engine}.compile={value!r}: choose true, false or auto")


@torch.no_grad()
def flops_per_sample(run: Callable[[Tensor], object], example: Tensor) -> float:
    """Forward FLOPs of `run(example)` per sample (counted by PyTorch's FlopCounterMode: matmuls and convs)."""
    with FlopCounterMode(display=False) as counter:
        run(example)
    return counter.get_total_flops() / len(example)


def network_flops(net: nn.Module, example: Tensor) -> float:
    """Forward FLOPs per sample of `net` on `example`, counted on an eval-mode copy: the network's own BN
    statistics, hooks and RNG are untouched."""
    probe = copy.deepcopy(net).eval()
    for module in probe.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return flops_per_sample(probe, example)


def planned_flop(steps: int, batch: int, flops: float) -> float:
    """A synthesis's arithmetic: forward + backward (3 × the forward) of `steps` steps of `batch` samples."""
    return 3.0 * steps * batch * flops


def compile_pays(steps: int, batch: int, flops: float, device: torch.device) -> bool:
    """The `compile: auto` rule (module docstring): does compiling pay for `steps` steps of `batch` samples?"""
    if device.type == "cuda":
        return steps >= CUDA_BREAK_EVEN_STEPS
    if device.type == "cpu":
        return planned_flop(steps, batch, flops) >= CPU_BREAK_EVEN_FLOP
    return False


@functools.cache
def can_compile(device_type: str) -> bool:
    """Whether Inductor can build code for the device here: a C++ compiler (CPU) or Triton (CUDA)."""
    try:
        if device_type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            return bool(get_cpp_compiler())
        from torch.utils._triton import has_triton

        return device_type == "cuda" and has_triton()
    except Exception:  # no compiler found: Inductor raises its own error types
        return False


def decide(setting: bool | str, steps: int, batch: int, flops: Callable[[], float], device: torch.device,
           notes: list[str], engine: str) -> bool:
    """Whether this boundary's synthesis runs compiled; `auto` notes its choice and the numbers behind it (and
    stays eager, saying so, where Inductor has no compiler for the device)."""
    if setting != "auto":
        return bool(setting)
    if not can_compile(device.type):
        notes.append(f"{engine} compile auto: off (no compiler for torch.compile on {device.type} here)")
        return False
    per_sample = flops()
    on = compile_pays(steps, batch, per_sample, device)
    planned = planned_flop(steps, batch, per_sample)
    notes.append(f"{engine} compile auto: {'on' if on else 'off'} ({steps} steps of batch {batch}, "
                 f"{planned:.2g} FLOP planned on {device.type}; break-even {CPU_BREAK_EVEN_FLOP:.0e} FLOP on cpu, "
                 f"{CUDA_BREAK_EVEN_STEPS} steps on cuda)")
    return on


class CompiledTeacher:
    """A teacher's forward (`__call__`, `features`) with its backbone compiled and its head eager (see the
    module docstring for why); any other network is compiled whole. Register BN hooks before the first call:
    the compiled graph runs them."""

    def __init__(self, teacher: nn.Module, mode: str = "default") -> None:
        self.teacher = teacher
        split = isinstance(teacher, IncrementalClassifier) and type(teacher).forward is IncrementalClassifier.forward
        self.backbone = torch.compile(teacher.backbone, mode=mode) if split else None
        self.whole = None if split else torch.compile(teacher, mode=mode)

    def __call__(self, x: Tensor) -> Tensor:
        if self.backbone is None:
            return self.whole(x)
        return self.teacher.head(self.backbone(x))

    def features(self, x: Tensor) -> Tensor:
        return self.teacher.features(x) if self.backbone is None else self.backbone(x)


def compiled_teacher(teacher: nn.Module, enabled: bool, mode: str = "default") -> nn.Module | CompiledTeacher:
    """The teacher to run a synthesis through: compiled (`CompiledTeacher`) or itself."""
    return CompiledTeacher(teacher, mode) if enabled else teacher


def compiled_module(module: nn.Module, enabled: bool, mode: str = "default") -> nn.Module:
    """A generator (or any module kept whole) compiled; a fresh one of the same class reuses the compiled code."""
    return torch.compile(module, mode=mode) if enabled else module
