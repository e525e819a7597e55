"""Pieces every synthesis engine shares: BatchNorm statistics hooks, image priors, augmentation,
class-balanced targets, mixed precision, the synthesis progress bar and its deferred NaN guard."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cl_inversion.utils.nn_utils import batchnorm_layers, frozen_eval  # noqa: F401  (frozen_eval: engines' teacher mode)

log = logging.getLogger("cl_inversion")


class SynthesisError(RuntimeError):
    """A synthesis diverged (NaN/Inf loss); never replay what it produced."""


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(N(mean_p, var_p) ‖ N(mean_q, var_q)) per dimension."""
    var_p, var_q = var_p + eps, var_q + eps
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0)


def batch_moments(x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over (N, H, W) in one pass, accumulated in fp32.

    The variance is E[(x − k)²] − E[x − k]² with k a per-channel shift near the mean (the layer's running
    mean): without it E[x²] − E[x]² cancels catastrophically when |mean| ≫ std; with it the result equals
    the two-pass `var` to ~1e-6 relative, at the cost of one pass instead of two. On a GPU one fused
    `torch.var_mean` kernel instead: there these small layers are bound by kernel launches, not arithmetic
    (measured on an H200, docs/gpu.md: with `var_mean` instead of the shifted form the pixel step takes
    0.87x the time, the generator step 0.92x)."""
    x = x.float()
    dims = [0] + list(range(2, x.dim()))
    if x.is_cuda:
        var, mean = torch.var_mean(x, dims, unbiased=False)
        return mean, var
    if shift is None:
        centred = x
    else:
        shift = shift.detach().float().view(1, -1, *([1] * (x.dim() - 2)))
        centred = x - shift
    offset = centred.mean(dims)
    var = (centred * centred).mean(dims) - offset * offset
    mean = offset if shift is None else offset + shift.flatten()
    return mean, var.clamp_min(0.0)


class InputHooks:
    """Forward hooks keeping the latest input of each of `modules` (`inputs[i]`); removed on leaving a `with`."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.inputs: list[Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.inputs[index] = inputs[0]
        return hook

    def __len__(self) -> int:
        return len(self.inputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


class BNStatistics:
    """Forward hooks on every BatchNorm layer of a network, comparing the statistics of the batch that
    enters the layer with the layer's running statistics (what the network saw on real data).

    After a forward pass: `kl()` is the mean over layers of the channel-mean KL(running ‖ batch) (ABD's
    term and the `bn_distance` metric), `norm_distance()` is DeepInversion's ‖μ−μ_run‖₂ + ‖σ²−σ²_run‖₂
    summed over layers, the first layer weighted `first_multiplier`.
    """

    def __init__(self, net: nn.Module) -> None:
        self.layers = batchnorm_layers(net)
        self.batch: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.batch[index] = batch_moments(inputs[0], getattr(module, "running_mean", None))

        return hook

    def _pairs(self) -> Iterator[tuple[nn.Module, Tensor, Tensor]]:
        for layer, stats in zip(self.layers, self.batch):
            if stats is None:
                raise RuntimeError("BNStatistics: no forward pass recorded since the hooks were attached")
            yield layer, stats[0], stats[1]

    def kl(self, reduction: str = "mean") -> Tensor:
        """Channel-mean KL(running ‖ batch) per layer, then the mean over layers (ABD's and cl-lite's loss,
        the `bn_distance` metric) or the sum."""
        if not self.layers:
            raise RuntimeError("the network has no BatchNorm layer: a BN-statistics term does not apply")
        terms = torch.stack([gaussian_kl(layer.running_mean, layer.running_var, mean, var).mean()
                             for layer, mean, var in self._pairs()])
        return terms.sum() if reduction == "sum" else terms.mean()

    def norm_distance(self, first_multiplier: float = 10.0) -> Tensor:
        if not self.layers:
            raise RuntimeError("the network has no BatchNorm layer: a BN-statistics term does not apply")
        terms = [torch.linalg.vector_norm(mean - layer.running_mean) + torch.linalg.vector_norm(var - layer.running_var)
                 for layer, mean, var in self._pairs()]
        weights = [first_multiplier] + [1.0] * (len(terms) - 1)
        return sum(w * t for w, t in zip(weights, terms))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> BNStatistics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def total_variation_l2(x: Tensor) -> Tensor:
    """DeepInversion's L2 total-variation prior: the sum of the L2 norms of the pixel differences in 4
    directions (right, down, both diagonals), over the whole batch (NVlabs/DeepInversion
    `cifar10/deepinversion_cifar10.py` and `deepinversion.py` `get_image_prior_losses`)."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in diffs)


def abd_blur_kernel(size: int = 5, sigma: float = 1.0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Tensor:
    """ABD's 2-D smoothing kernel, `exp(-((x-μ)/(2σ))²)` normalised to sum 1 (GT-RIPL/AlwaysBeDreaming-DFCIL
    `learners/datafree_helper.py` `Gaussiansmoothing`; also gqk/cl-lite's): note 2σ, not √2σ. Made on `device`
    (a synthesis step makes it on its own device: nothing copied from the host, which a CUDA graph could not replay)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    kernel1d = torch.exp(-((coords / (2 * sigma)) ** 2))
    kernel = kernel1d[:, None] * kernel1d[None, :]
    return kernel / kernel.sum()


def gaussian_blur(x: Tensor, size: int = 5, sigma: float = 1.0) -> Tensor:
    """Depth-wise blur with ABD's kernel and reflect padding (ABD's smoothness target); inputs no larger
    than the padding fall back to replicate padding."""
    kernel = abd_blur_kernel(size, sigma, x.dtype, x.device).expand(x.shape[1], 1, size, size)
    pad = size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(x, (pad,) * 4, mode=mode), kernel, groups=x.shape[1])


def jitter_flip(x: Tensor, max_shift: int, flip: bool) -> Tensor:
    """DeepInversion's augmentation: a random roll of up to `max_shift` pixels and a random flip."""
    if max_shift > 0:
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if flip and torch.rand(()) < 0.5:
        x = x.flip(3)
    return x


def balanced_labels(classes: Sequence[int], n: int) -> Tensor:
    """n labels cycling through `classes`: counts differ by at most one."""
    classes_t = torch.as_tensor(list(classes), dtype=torch.long)
    return classes_t.repeat(math.ceil(n / len(classes_t)))[:n]


def clamp_to(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    return torch.max(torch.min(x, high), low)


def cosine_value(base_lr: float, step: int, total: int) -> float:
    """The cosine-annealed learning rate of `step` of `total` (the schedule of DeepInversion's ImageNet script)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * step / total))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place where it is a tensor (a captured step reads it from there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def pixel_step(optimizer: torch.optim.Optimizer, loss: Tensor, x: Tensor, low: Tensor, high: Tensor) -> None:
    """One optimisation step on images, then clamp them back into the data's pixel range."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        x.copy_(clamp_to(x, low, high))


def autocast(precision: str, device: torch.device):
    """Mixed precision for a teacher's forward: `32` (off) or `bf16-mixed`. Without autocast's weight cache: a
    step uses each weight once, and a cache filled inside a CUDA graph's capture would outlive its memory
    (PyTorch's CUDA-graph notes ask for `cache_enabled=False`); the numbers are the same."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=False)


PRECISIONS = ("32", "bf16-mixed")


@dataclass
class SynthesisStats:
    """What a synthesis cost and how it went (filled by the engine, read by the callback)."""

    full_model_passes: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)  # loss terms every `log_every` steps
    notes: list[str] = field(default_factory=list)


LOG_LINE_S = 60.0  # seconds between synthesis progress lines when stderr is not a terminal


class SynthesisProgress:
    """A tqdm bar (ETA included) showing the current loss terms; records the loss curve; and the NaN guard.

    Nothing is read back to the host between log points: every step folds `isfinite(loss)` into a
    device-side flag, and every `log_every` steps (and at the last) one read fetches the flag and the loss
    terms together. A non-finite loss raises `SynthesisError` naming the step range it fell in."""

    def __init__(self, total: int, desc: str, stats: SynthesisStats, log_every: int = 10,
                 enabled: bool = True, engine: str = "", hint: str = "") -> None:
        # disable=None: no bar when stderr is not a terminal (cluster logs); the curve is still recorded
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=None if enabled else True, dynamic_ncols=True)
        self.stats = stats
        self.log_every = max(int(log_every), 1)
        self.step = 0
        self.checked = 0  # steps already known to be finite
        self.engine, self.hint = engine, hint
        self.bad: Tensor | None = None
        # no bar in a log file (cluster jobs): a line per minute and one at the end instead
        self.desc, self.log_lines = desc, enabled and not sys.stderr.isatty()
        self.last_line = time.monotonic()

    def update(self, terms: dict[str, Tensor | float], loss: Tensor | None = None) -> None:
        self.step += 1
        if loss is not None:
            bad = ~torch.isfinite(loss.detach())
            self.bad = bad if self.bad is None else self.bad | bad
        if self.step % self.log_every == 0 or self.step == self.bar.total:
            self.flush(terms)
        self.bar.update(1)

    def flush(self, terms: dict[str, Tensor | float]) -> None:
        """One host read: the NaN flag and the loss terms of the current step."""
        names = list(terms)
        tensors = [t.detach().float().reshape(()) for t in terms.values() if isinstance(t, Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        flag = (self.bad if self.bad is not None else torch.zeros((), dtype=torch.bool, device=device))
        read = torch.stack([flag.to(device).float(), *tensors]).tolist() if tensors else [float(flag)]
        if read[0]:
            raise SynthesisError(f"{self.engine} synthesis: non-finite loss between steps {self.checked} and "
                                 f"{self.step - 1}{'; ' + self.hint if self.hint else ''}")
        self.checked = self.step
        values, it = {}, iter(read[1:])
        for name in names:
            values[name] = next(it) if isinstance(terms[name], Tensor) else float(terms[name])
        self.stats.curve.append({"step": self.step, **values})
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if self.log_lines and (self.step == self.bar.total or time.monotonic() - self.last_line >= LOG_LINE_S):
            self.last_line = time.monotonic()
            terms = " ".join(f"{k} {v:.3g}" for k, v in values.items())
            log.info(f"{self.desc}: step {self.step}/{self.bar.total} | {terms}")

    def close(self) -> None:
        self.bar.close()


@contextmanager
def memory_format(net: nn.Module, channels_last: bool) -> Iterator[nn.Module]:
    """Run a conv teacher in channels-last layout (faster convolutions on most accelerators), then back."""
    if not channels_last:
        yield net
        return
    net.to(memory_format=torch.channels_last)
    try:
        yield net
    finally:
        net.to(memory_format=torch.contiguous_format)


T = TypeVar("T")


def retry_on_nan(attempt: Callable[[float, int], T], lr: float, retries: int, stats: SynthesisStats,
                 what: str) -> T:
    """`attempt(lr, k)`; on a `SynthesisError` (non-finite loss) try again with half the learning rate, up to
    `retries` times (each engine's `nan_retries`), noting every retry in `stats.notes`."""
    for k in range(retries + 1):
        try:
            return attempt(lr, k)
        except SynthesisError:
            if k == retries:
                raise
            lr /= 2
            stats.notes.append(f"{what}: NaN loss, retrying with lr={lr:g}")
    raise AssertionError("unreachable")


PixelLoss = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class PixelSchedule:
    """How a batch of images is optimised (DeepInversion's loop): Adam at `lr` with `betas` for `steps` steps,
    cosine-annealed or constant, on a jittered/flipped view, clamped to the pixel box after every step."""

    steps: int
    lr: float
    betas: tuple[float, float]
    cosine: bool
    jitter: int
    flip: bool


def jitter_plan(steps: int, height: int, width: int, max_shift: int, flip: bool) -> Tensor:
    """Every step's `jitter_flip` as gather indices, `(steps, height + width)`: the rows, then the columns, of
    the view. Drawn up front in the order `jitter_flip` draws them (the same CPU random stream), so the views
    are the same; a step then reads its indices from a tensor instead of taking shifts as Python numbers (no
    host value in the step: a CUDA graph can replay it)."""
    rows, cols = torch.arange(height), torch.arange(width)
    plan = torch.empty(steps, height + width, dtype=torch.long)
    for step in range(steps):
        dx = dy = 0
        if max_shift > 0:
            dx, dy = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
        flipped = flip and torch.rand(()).tolist() < 0.5
        plan[step, :height] = (rows - dx) % height  # torch.roll: out[i] = x[(i - shift) mod size]
        plan[step, height:] = ((width - 1 - cols if flipped else cols) - dy) % width
    return plan


def planned_view(x: Tensor, index: Tensor) -> Tensor:
    """The view `jitter_plan` row `index` describes: `x` gathered along height, then width."""
    height = x.shape[-2]
    return x.index_select(2, index[:height]).index_select(3, index[height:])


def optimise_pixels(x: Tensor, loss_of_view: PixelLoss, schedule: PixelSchedule, pixel_range: tuple[Tensor, Tensor],
                    stats: SynthesisStats, progress: SynthesisProgress, step_hook: Callable | None = None,
                    capture: bool = False) -> Tensor:
    """The DeepInversion loop that the pixel engine and PMI's full-model phase share; only the loss differs.
    `loss_of_view(view) -> (loss, terms)`; `x` (requires grad) is updated in place; one full-model pass per
    step. Returns the optimised images, detached.

    A step reads only static tensors (graphing.py): its jitter is a row of `jitter_plan`, copied in before the
    step; a cosine learning rate, when captured, is a tensor filled before the step. `capture` records the
    step in a CUDA graph after the warm-up steps and replays it (`StepGraph`)."""
    from cl_inversion.inversion.graphing import StepGraph, adam_update  # graphing imports nothing from here

    low, high = (r.to(x.device) for r in pixel_range)
    plan = jitter_plan(schedule.steps, x.shape[-2], x.shape[-1], schedule.jitter, schedule.flip).to(x.device)
    index = plan[0].clone()
    lr = torch.full((), schedule.lr, device=x.device) if capture and schedule.cosine else schedule.lr
    optimizer = torch.optim.Adam([x], lr=lr, betas=schedule.betas, eps=1e-8)

    def step() -> tuple[Tensor, dict[str, Tensor]]:
        loss, terms = loss_of_view(planned_view(x, index))
        pixel_step(optimizer, loss, x, low, high)
        return loss, terms

    run_step = StepGraph(step, capture, progress.engine or "pixel")
    if step_hook is not None:
        step_hook(x.detach(), -1)
    try:
        with adam_update(optimizer, capturable=capture):
            for i in range(schedule.steps):
                if schedule.cosine:
                    set_lr(optimizer, cosine_value(schedule.lr, i, schedule.steps))
                index.copy_(plan[i])
                loss, terms = run_step()
                stats.full_model_passes += 1
                progress.update(terms, loss)
                if step_hook is not None:
                    step_hook(x.detach(), i)
    finally:
        progress.close()
    return x.detach()
