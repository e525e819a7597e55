"""Whole-step CUDA graphs for synthesis (`cuda_graph: auto`, the default of the pixel and generator engines).

On a GPU a synthesis step is bound by kernel launches, not arithmetic: a ResNet-32 generator step is hundreds
of small kernels around a few milliseconds of arithmetic. A CUDA graph records one whole step — the teacher's
forward with its BN hooks, the losses, the backward and the optimizer's update — and replays it with one launch.

This follows PyTorch's whole-network capture (`torch.cuda.graphs`, "Whole-network capture"): a few warm-up
steps on a side stream, Adam's `capturable` update (its step counts on the device), then one capture. A replay
reruns the recorded kernels on the recorded memory, so a step is written as a function of *static* tensors:
what changes between steps (the latent batch, the jitter's gather indices, a scheduled learning rate) is written
into tensors made before the capture (`out=`, `copy_`, `fill_`), and what a step keeps (the images, Adam's
moments) is updated in place. Nothing in a step reads the device back to the host; the progress bar's one read
every `log_every` steps happens between replays.

The engines run the same step function eagerly (no capture) everywhere else, so a graphed run and an eager one
compute the same step; the warm-up steps are real steps of the synthesis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import torch

from cl_inversion.utils.errors import ConfigError

#: steps run eagerly on a side stream before the capture (PyTorch's recipe uses 3: lazy initialisation,
#: cuDNN's algorithm choice and, when compiled, Dynamo's compile happen there, not in the graph)
GRAPH_WARMUP_STEPS = 3
#: `cuda_graph: auto` captures a phase of at least this many steps. Capturing costs about one eager step beyond
#: the warm-up (which are real steps), and every replayed step saves most of its launch overhead, so this only
#: keeps captures out of phases too short to replay at all (the digits budgets' pixel chunks still qualify).
GRAPH_MIN_STEPS = 2 * GRAPH_WARMUP_STEPS


def check_cuda_graph(value: bool | str, compile_mode: str, engine: str) -> bool | str:
    """The engine's `cuda_graph` setting, validated: true, false or auto; `true` excludes
    `compile_mode: reduce-overhead` (Inductor's own CUDA graphs inside the step's)."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"inversion.{engine}.cuda_graph={value!r}: choose true, false or auto")
    if value is True and compile_mode == "reduce-overhead":
        raise ConfigError(f"inversion.{engine}.cuda_graph=true captures the whole step and "
                          "compile_mode=reduce-overhead captures its own graphs inside it: "
                          "set compile_mode=default or cuda_graph=false")
    return value


def use_graphs(setting: bool | str, steps: int, device: torch.device, compile_mode: str, notes: list[str],
               engine: str) -> bool:
    """Whether this phase's steps are captured: `true` forces it (a CUDA device needed), `auto` captures on CUDA
    a phase of at least `GRAPH_MIN_STEPS` steps unless Inductor's `reduce-overhead` graphs are asked for."""
    if setting is False:
        return False
    if device.type != "cuda":
        if setting is True:
            raise ConfigError(f"inversion.{engine}.cuda_graph=true needs a CUDA device (the teacher is on "
                              f"{device.type}): set cuda_graph=false or auto")
        return False
    if setting == "auto" and compile_mode == "reduce-overhead":
        notes.append(f"{engine} cuda_graph auto: off (compile_mode=reduce-overhead makes Inductor's own graphs)")
        return False
    on = setting is True or steps >= GRAPH_MIN_STEPS
    notes.append(f"{engine} cuda_graph {setting}: {'on' if on else 'off'} ({steps} steps, "
                 f"{GRAPH_WARMUP_STEPS} of them warm-up)")
    return on


Out = TypeVar("Out")


class StepGraph(Generic[Out]):
    """`step()` — one synthesis step over static tensors, returning the tensors it reports — called as is, or
    (`capture`) eagerly on a side stream for the first `warmup` calls, then captured once and replayed: each
    later call is one `replay()`, and returns the same (static) output tensors, refreshed."""

    def __init__(self, step: Callable[[], Out], capture: bool, engine: str = "<engine>",
                 warmup: int = GRAPH_WARMUP_STEPS) -> None:
        self.step, self.capture, self.warmup, self.engine = step, capture, warmup, engine
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Out | None = None
        self.side = torch.cuda.Stream() if capture else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> Out:
        if not self.capture:
            return self.step()
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step()
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.outputs = self.step()
            except RuntimeError as err:
                raise RuntimeError(f"capturing the synthesis step in a CUDA graph failed ({err}); set "
                                   f"inversion.{self.engine}.cuda_graph=false to run it eagerly") from err
            self.graph = graph
        self.graph.replay()
        return self.outputs


@contextmanager
def adam_update(optimizer: torch.optim.Optimizer, fused: bool = False, capturable: bool = False) -> Iterator[None]:
    """Step an Adam optimizer with its fused kernel (`fused`: one pass over the parameters; the compiled generator
    step, where the per-tensor foreach update was 3 % of a CPU step) or its `capturable` update (step counts on
    the device, no host read: a CUDA graph can record it), and restore its flags after, so eager runs and
    checkpoints keep the default update. Adam keeps its step counts on the parameters' device when fused or
    capturable and on the host otherwise (on a CPU both are the same): they are moved to match each way."""
    if not (fused or capturable) or not isinstance(optimizer, torch.optim.Adam):
        yield
        return
    saved = [(group.get("fused"), group.get("foreach"), group.get("capturable")) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        if fused:
            group["fused"], group["foreach"] = True, None
        group["capturable"] = capturable or bool(group.get("capturable"))
    _place_steps(optimizer, on_device=True)
    try:
        yield
    finally:
        for group, (was_fused, foreach, was_capturable) in zip(optimizer.param_groups, saved):
            group["fused"], group["foreach"], group["capturable"] = was_fused, foreach, was_capturable
        _place_steps(optimizer, on_device=False)


def _place_steps(optimizer: torch.optim.Optimizer, on_device: bool) -> None:
    """Adam's step counts where its update expects them: the parameter's device (fused, capturable) or the host."""
    for group in optimizer.param_groups:
        fused = bool(group.get("fused"))
        keep = on_device or fused or bool(group.get("capturable"))
        dtype = torch.float32 if (on_device or fused) else torch.get_default_dtype()  # as Adam's `_get_scalar_dtype`
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(param.device if keep else "cpu", dtype)
