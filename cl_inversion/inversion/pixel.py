"""DeepInversion (Yin et al., CVPR 2020): optimise a batch of pixels against the frozen teacher.

Loss per step on a jittered view of the batch: cross-entropy to class-balanced targets + BatchNorm
statistics (‖μ−μ_run‖₂ + ‖σ²−σ²_run‖₂ summed over BN layers) + L2 total variation (sum of the L2 norms
of the pixel differences in 4 directions) + the L2 norm of the batch; pixels clamped to the data range
after every step.

Defaults are NVlabs/DeepInversion `cifar10/deepinversion_cifar10.py` with its README's paper
parameters: 2k steps, batch 256, Adam with default betas at a constant lr 0.05, BN weight 10, TV 2.5e-5,
a random roll of ≤2 pixels, no flip, every BN layer weighted 1. The ImageNet script's form
(`deepinversion.py`) is the named option `first_bn_multiplier=10 flip=true betas=[0.5,0.9]
lr_schedule=cosine` (its cosine has a 100-step warm-up; ours has none). The clamp is ours (the CIFAR
script does not clamp): it keeps replayed images in the range the student sees real data in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.inversion.common import (
    PRECISIONS,
    BNStatistics,
    PixelSchedule,
    SynthesisProgress,
    SynthesisStats,
    autocast,
    balanced_labels,
    frozen_eval,
    memory_format,
    optimise_pixels,
    retry_on_nan,
    total_variation_l2,
)
from cl_inversion.inversion.compiling import check_compile, compiled_teacher
from cl_inversion.inversion.engine import EngineBase
from cl_inversion.inversion.graphing import check_cuda_graph, use_graphs
from cl_inversion.utils.errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")


class PixelInversion(EngineBase):
    """Synthesis engine: `synthesize(teacher, classes, n) -> (images, labels)` by pixel optimisation."""

    name = "pixel"

    def __init__(self, steps: int = 2000, batch_size: int = 256, lr: float = 0.05, ce_weight: float = 1.0,
                 bn_weight: float = 10.0, first_bn_multiplier: float = 1.0, tv_weight: float = 2.5e-5,
                 l2_weight: float = 0.0, jitter: int = 2, flip: bool = False,
                 betas: Sequence[float] = (0.9, 0.999), lr_schedule: str = "constant", precision: str = "32",
                 channels_last: bool = False, compile: bool | str = "auto", compile_mode: str = "default",
                 cuda_graph: bool | str = "auto", nan_retries: int = 0, progress: bool = True,
                 log_every: int = 10) -> None:
        super().__init__()
        if str(precision) not in PRECISIONS:
            raise ConfigError(f"inversion.pixel.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.precision, self.channels_last = str(precision), channels_last
        self.compile, self.compile_mode = check_compile(compile, compile_mode, self.name), compile_mode
        self.cuda_graph = check_cuda_graph(cuda_graph, compile_mode, self.name)
        self.graphed = False  # this boundary's choice
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"inversion.pixel.lr_schedule={lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        self.betas, self.lr_schedule = tuple(float(b) for b in betas), lr_schedule
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.ce_weight, self.bn_weight, self.first_bn_multiplier = ce_weight, bn_weight, first_bn_multiplier
        self.tv_weight, self.l2_weight = tv_weight, l2_weight
        self.jitter, self.flip = jitter, flip
        self.nan_retries, self.progress, self.log_every = nan_retries, progress, log_every

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        self.stats = SynthesisStats()
        labels = balanced_labels(classes, n)
        device = next(teacher.parameters()).device
        chunks = []
        on = self.compiles(teacher, n)
        self.graphed = use_graphs(self.cuda_graph, self.steps, device, self.compile_mode, self.stats.notes, self.name)
        with frozen_eval(teacher), BNStatistics(teacher) as bn, memory_format(teacher, self.channels_last):
            if not len(bn):
                self.stats.notes.append("teacher has no BatchNorm layer: BN-statistics term disabled")
            model = compiled_teacher(teacher, on, self.compile_mode)
            for start in range(0, n, self.batch_size):
                targets = labels[start : start + self.batch_size].to(device)
                chunk = start // self.batch_size
                chunks.append(retry_on_nan(lambda lr, _, t=targets, c=chunk: self._run(model, bn, t, lr, c),
                                           self.lr, self.nan_retries, self.stats, f"chunk {chunk}"))
        return torch.cat(chunks), labels

    def planned_steps(self, n: int) -> tuple[int, int]:
        return self.steps * math.ceil(n / self.batch_size), min(self.batch_size, n)

    def loss(self, teacher: nn.Module, bn: BNStatistics, view: Tensor, targets: Tensor) -> tuple[Tensor, dict]:
        """DeepInversion's loss on one (jittered) view of the batch, and its terms."""
        device = view.device
        with autocast(self.precision, device):
            logits = teacher(view)
        ce = F.cross_entropy(logits.float(), targets)
        bn_term = bn.norm_distance(self.first_bn_multiplier) if len(bn) else torch.zeros((), device=device)
        loss = self.ce_weight * ce + self.bn_weight * bn_term
        tv = total_variation_l2(view) if self.tv_weight else torch.zeros((), device=device)
        loss = loss + self.tv_weight * tv
        if self.l2_weight:  # the CIFAR script's `torch.norm(inputs_jit, 2)`; off by default
            loss = loss + self.l2_weight * torch.linalg.vector_norm(view)
        return loss, {"loss": loss, "ce": ce, "bn": bn_term, "tv": tv}

    def _run(self, teacher: nn.Module, bn: BNStatistics, targets: Tensor, lr: float, chunk: int) -> Tensor:
        x = torch.randn(len(targets), *self.image_shape, device=targets.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        progress = SynthesisProgress(self.steps, f"DeepInversion batch {chunk}", self.stats, self.log_every,
                                     self.progress, engine=self.name,
                                     hint=f"lower inversion.{self.name}.lr or set inversion.{self.name}.nan_retries")
        schedule = PixelSchedule(self.steps, lr, self.betas, self.lr_schedule == "cosine", self.jitter, self.flip)
        return optimise_pixels(x, lambda view: self.loss(teacher, bn, view, targets), schedule, self.pixel_range,
                               self.stats, progress, self.step_hook, capture=self.graphed)
