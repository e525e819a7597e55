"""Always Be Dreaming (Smith et al., ICCV 2021): train a generator (latent → image) against the frozen
teacher instead of optimising pixels.

Generator loss: content (cross-entropy of teacher logits / 1000 to their own argmax) + diversity
(1 − entropy of the batch-mean softmax / log K) + BN statistics (KL(running ‖ batch), channel mean,
**averaged over BN layers**, ×50) + smoothness (MSE to ABD's 5×5 blur of reflect-padded images, ×1e-3).
Published: 10k steps, batch 128, Adam 1e-3, latent 1000; the generator and its optimiser are kept
across tasks (ABD; R-DFCIL trains a fresh one per task).

Reference: GT-RIPL/AlwaysBeDreaming-DFCIL `learners/datafree_helper.py` (`Teacher.get_images`: each BN
hook weighted `r_feature_weight / len(hooks)`, `Gaussiansmoothing`) and gqk/cl-lite
`deep_inversion/generative_inversion.py` (`criterion_rf`: `.mean()` over hooks). `bn_reduction="sum"`
(this project's earlier form, 33× the reference's weight on ResNet-32) is kept only to reproduce old runs.
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
    SynthesisProgress,
    SynthesisStats,
    autocast,
    frozen_eval,
    gaussian_blur,
    memory_format,
    retry_on_nan,
)
from cl_inversion.inversion.compiling import check_compile, compiled_module, compiled_teacher, network_flops
from cl_inversion.inversion.engine import EngineBase
from cl_inversion.inversion.graphing import StepGraph, adam_update, check_cuda_graph, use_graphs
from cl_inversion.inversion.replay import GeneratorReplay
from cl_inversion.utils.errors import ConfigError


class Generator(nn.Module):
    """ABD's generator: linear → 128×(s/4)² → 2× [upsample, conv, BN, LeakyReLU] → conv → tanh → BN.

    The output BatchNorm (no affine) standardises each channel, matching normalised input images.
    (BN eps 0.8 in the hidden layers is the reference implementation's, inherited from DCGAN code.)
    """

    def __init__(self, z_dim: int = 1000, channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.init_size = max(image_size // 4, 1)
        self.l1 = nn.Linear(z_dim, 128 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
            nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False))
        self.image_size = image_size

    def forward(self, z: Tensor) -> Tensor:
        x = self.bn0(self.l1(z).view(len(z), 128, self.init_size, self.init_size))
        x = self.block1(F.interpolate(x, scale_factor=2))
        x = self.block2(F.interpolate(x, size=self.image_size))
        return x

    def sample(self, n: int) -> Tensor:
        return self(torch.randn(n, self.z_dim, device=self.l1.weight.device))


class GeneratorInversion(EngineBase):
    """Synthesis engine: trains a generator against the teacher, then samples a class-balanced set."""

    name = "generator"

    def __init__(self, steps: int = 10000, batch_size: int = 128, lr: float = 1e-3, z_dim: int = 1000,
                 content_temperature: float = 1000.0, content_weight: float = 1.0, diversity_weight: float = 1.0,
                 bn_weight: float = 50.0, smooth_weight: float = 1e-3, keep_across_tasks: bool = True,
                 bn_reduction: str = "mean", precision: str = "32", channels_last: bool = False,
                 compile: bool | str = "auto", compile_mode: str = "default", cuda_graph: bool | str = "auto",
                 nan_retries: int = 0, progress: bool = True, log_every: int = 10) -> None:
        super().__init__()
        if str(precision) not in PRECISIONS:
            raise ConfigError(f"inversion.{self.name}.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.precision, self.channels_last = str(precision), channels_last
        self.compile, self.compile_mode = check_compile(compile, compile_mode, self.name), compile_mode
        self.cuda_graph = check_cuda_graph(cuda_graph, compile_mode, self.name)
        if bn_reduction not in ("mean", "sum"):
            raise ConfigError(f"inversion.{self.name}.bn_reduction={bn_reduction!r}: choose mean (ABD, cl-lite) or sum")
        self.bn_reduction = bn_reduction
        self.steps, self.batch_size, self.lr, self.z_dim = steps, batch_size, lr, z_dim
        self.content_temperature, self.content_weight = content_temperature, content_weight
        self.diversity_weight, self.bn_weight, self.smooth_weight = diversity_weight, bn_weight, smooth_weight
        self.keep_across_tasks = keep_across_tasks
        self.nan_retries, self.progress, self.log_every = nan_retries, progress, log_every
        self.generator: Generator | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _fresh_generator(self, device: torch.device, lr: float) -> None:
        channels, size = self.image_shape[0], self.image_shape[-1]
        self.generator = Generator(self.z_dim, channels, size).to(device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr)

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        self.stats = SynthesisStats()
        device = next(teacher.parameters()).device

        def attempt(lr: float, k: int) -> None:
            if self.generator is None or not self.keep_across_tasks or k > 0:
                self._fresh_generator(device, lr)
            self.generator.to(device)
            self.optimizer.load_state_dict(self.optimizer.state_dict())  # moves Adam state to the device
            self._train(teacher, len(classes))

        retry_on_nan(attempt, self.lr, self.nan_retries, self.stats, "generator (fresh)")
        return self.sample_balanced(teacher, classes, n)

    def _train(self, teacher: nn.Module, n_classes: int) -> None:
        generator = self.generator
        device = next(teacher.parameters()).device
        generator.train()
        generator.requires_grad_(True)  # the previous task's replay froze it while the student trained
        progress = SynthesisProgress(self.steps, "ABD generator", self.stats, self.log_every, self.progress,
                                     engine=self.name, hint=f"lower inversion.{self.name}.lr or set nan_retries")
        on = self.compiles(teacher, n=0)  # the generator's plan does not depend on the images sampled after
        graphed = use_graphs(self.cuda_graph, self.steps, device, self.compile_mode, self.stats.notes, self.name)
        z = torch.empty(self.batch_size, generator.z_dim, device=device)  # the step's input, refilled every step
        with (frozen_eval(teacher), BNStatistics(teacher) as bn, memory_format(teacher, self.channels_last),
              memory_format(generator, self.channels_last),
              adam_update(self.optimizer, fused=on and not graphed, capturable=graphed)):
            if not len(bn):
                self.stats.notes.append("teacher has no BatchNorm layer: BN-statistics term disabled")
            model = compiled_teacher(teacher, on, self.compile_mode)
            sampler = compiled_module(generator, on, self.compile_mode)

            def step() -> dict[str, Tensor]:
                with autocast(self.precision, device):
                    images = sampler(z)
                    if self.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    terms = self.loss_terms(model, bn, images, n_classes)
                self.optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                self.optimizer.step()
                return terms

            run_step = StepGraph(step, capture=graphed, engine=self.name)
            try:
                for _ in range(self.steps):
                    torch.randn(z.shape, device=device, out=z)
                    terms = run_step()
                    self.stats.full_model_passes += 1
                    progress.update(terms, terms["loss"])
            finally:
                progress.close()
                if graphed:  # the captured step's gradients live in the graph's memory pool: freed with it
                    self.optimizer.zero_grad(set_to_none=True)

    def planned_steps(self, n: int) -> tuple[int, int]:
        return self.steps, self.batch_size  # the generator trains for its steps whatever the images sampled after

    def step_flops(self, teacher: nn.Module) -> float:
        """Forward FLOPs per generated image of a step: the generator's and the teacher's."""
        z = torch.zeros(2, self.z_dim, device=next(teacher.parameters()).device)
        return network_flops(self.generator, z) + super().step_flops(teacher)

    def loss_terms(self, teacher: nn.Module, bn: BNStatistics, images: Tensor, n_classes: int) -> dict[str, Tensor]:
        """The generator loss on one batch of generated images (`bn` hooks the teacher), term by term."""
        logits = teacher(images)[:, :n_classes]
        content = F.cross_entropy(logits / self.content_temperature, logits.argmax(1))
        mean_p = F.softmax(logits, dim=1).mean(0)
        diversity = 1.0 + (mean_p * torch.log(mean_p + 1e-12)).sum() / math.log(max(n_classes, 2))
        bn_term = bn.kl(reduction=self.bn_reduction) if len(bn) else torch.zeros((), device=images.device)
        smooth = F.mse_loss(images, gaussian_blur(images)) if self.smooth_weight else torch.zeros_like(content)
        loss = (self.content_weight * content + self.diversity_weight * diversity
                + self.bn_weight * bn_term + self.smooth_weight * smooth)
        return {"loss": loss, "content": content, "diversity": diversity, "bn": bn_term, "smooth": smooth}

    @torch.no_grad()
    def sample_balanced(self, teacher: nn.Module, classes: Sequence[int], n: int,
                        oversample: int = 4) -> tuple[Tensor, Tensor]:
        """n images, as class-balanced as the generator allows: candidates labelled by the teacher, then
        n/K per class. Classes the generator misses are filled with other images but keep their intended
        label, so the teacher accuracy on the set measures how well the generator covers the classes."""
        self.generator.eval()
        with frozen_eval(teacher):
            candidates = torch.cat([self.generator.sample(min(n, 512)) for _ in range(
                math.ceil(oversample * n / min(n, 512)))])
            predicted = teacher(candidates)[:, : len(classes)].argmax(1).cpu()  # the selection runs on the host
        per_class = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
        chosen, intended, used = [], [], torch.zeros(len(candidates), dtype=torch.bool)
        for c, k in zip(classes, per_class):
            idx = (predicted == c).nonzero().flatten()[:k]
            used[idx] = True
            chosen.append(idx)
            intended += [c] * k
        spare = (~used).nonzero().flatten()
        index, offset = [], 0
        for c_idx, k in zip(chosen, per_class):
            missing = k - len(c_idx)
            index += [c_idx, spare[offset : offset + missing]]
            offset += missing
        index = torch.cat(index).to(candidates.device)
        return candidates[index], torch.tensor(intended, dtype=torch.long)  # images stay on the teacher's device

    def replay(self, teacher: nn.Module, images: Tensor, labels: Tensor) -> GeneratorReplay:
        return GeneratorReplay(self.generator, teacher)

    def state_dict(self) -> dict:
        if self.generator is None:
            return {}
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "image_shape": list(self.image_shape)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            if "image_shape" in state:  # resume builds the engine before setup() has run
                self.image_shape = tuple(state["image_shape"])
            self._fresh_generator(torch.device("cpu"), self.lr)
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
