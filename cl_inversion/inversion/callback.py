"""The between-task inversion step: run a synthesis engine on the teacher the loop hands over (the frozen model of
the task just learned, `TaskContext.teacher`), measure what it produced, and hand the method a replay for the
next task (a `ContinualCallback` of the loop).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cl_inversion.inversion.common import BNStatistics, frozen_eval
from cl_inversion.inversion.engine import SynthesisEngine, missing_members
from cl_inversion.loop.hooks import ContinualCallback, ReplayStudent, TaskContext
from cl_inversion.utils.errors import ConfigError


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a64, rowvar=False)), np.atleast_2d(np.cov(b64, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def batched_features(net: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    device = next(net.parameters()).device
    return torch.cat([net.features(images[i : i + batch].to(device)).float().cpu()
                      for i in range(0, len(images), batch)])


class InversionCallback(ContinualCallback):
    """Runs `engine` (a `SynthesisEngine`, see `engine.py`) at every task boundary except after the last task
and hands its replay to the student (`method.receive_replay`) for the next task.

    Per boundary it records (results.json `inversion`, loggers `inversion/*`): `device` (where the
    engine ran: the trainer's), `wall_s`,
    `full_model_passes` (forward+backward passes of one batch through the whole teacher; per-layer
    engines count fractions), `teacher_accuracy` (teacher top-1 on the synthetic set vs intended
    labels), `bn_distance` (mean over BN layers of KL(running ‖ synthetic-batch statistics)) and
    `feature_distance` (Fréchet distance between teacher penultimate features of synthetic and real
    training images of the task just learned). A PNG grid of synthetic images goes to
    `inversion/task_<t>.png`.
    """

    def __init__(self, engine: SynthesisEngine, n_images: int = 2560, grid: bool = True,
                 metric_batch: int = 512, n_images_per_task: int = 0) -> None:
        missing = missing_members(engine)
        if missing:
            raise ConfigError(f"{type(engine).__name__} is not a synthesis engine: it lacks {', '.join(missing)} "
                              "(see cl_inversion/inversion/engine.py for the contract)")
        self.engine = engine
        self.n_images = n_images
        self.n_images_per_task = n_images_per_task  # PMI's pool: init_samples + per_task_samples · (t + 1)
        self.grid = grid
        self.metric_batch = metric_batch
        self.history: list[dict[str, Any]] = []
        self.images: Tensor | None = None
        self.labels: Tensor | None = None

    def between_tasks(self, method: ReplayStudent, context: TaskContext) -> None:
        if context.is_last:
            if getattr(self.engine, "open_set", None) is not None and getattr(method, "open_set_task", False):
                self.open_set(method, context)
            return
        teacher = frozen_teacher(context.teacher, method).to(context.device)
        self.engine.setup(context.image_shape, context.pixel_range)
        began = time.perf_counter()
        datamodule = context.datamodule
        real = (datamodule.augmented_train_dataloader() if getattr(self.engine, "observe_augmented", False)
                else datamodule.plain_train_dataloader())
        self.engine.observe(teacher, real, self.images, self.labels)
        classes = list(range(method.n_seen))
        images, labels = self.engine.synthesize(teacher, classes, self.n_images_for(context.task))
        wall_s = time.perf_counter() - began
        device = str(context.device)  # where the engine ran: the trainer's device
        self.images, self.labels = images.detach().cpu(), labels.cpu()
        record = {"task": context.task, "engine": self.engine.name, "device": device, "n_images": len(labels),
                  "wall_s": wall_s,
                  "full_model_passes": self.engine.stats.full_model_passes,
                  **self.measure(teacher, self.images, self.labels, context), "notes": self.engine.stats.notes}
        self.history.append(record)
        method.receive_replay(self.engine.replay(teacher, self.images, self.labels))
        grid_path = self.save_grid(context) if self.grid and getattr(self.engine, "pool_is_pixels", True) else None
        self.log_record(context, record, grid_path)

    def open_set(self, method: ReplayStudent, context: TaskContext) -> None:
        """The last task's classes have no data: the engine makes their block inputs from the seen classes
        (`synthesize_open_set`) and the method learns them (`train_open_set`) before the evaluation."""
        teacher = frozen_teacher(context.teacher, method).to(context.device)
        self.engine.setup(context.image_shape, context.pixel_range)
        began = time.perf_counter()
        images, labels = self.engine.synthesize_open_set(teacher, method.n_old, method.n_seen)
        synthesis_s = time.perf_counter() - began
        method.train_open_set(images, labels)
        self.history.append({"task": context.task, "engine": self.engine.name, "open_set": True,
                             "device": str(context.device), "n_images": len(labels), "wall_s": synthesis_s,
                             "train_s": time.perf_counter() - began - synthesis_s})

    def n_images_for(self, task: int) -> int:
        """Images made at the boundary after `task` (0-based): `n_images + n_images_per_task · (task + 1)`."""
        return self.n_images + self.n_images_per_task * (task + 1)

    @torch.no_grad()
    def measure(self, teacher: nn.Module, images: Tensor, labels: Tensor, context: TaskContext) -> dict[str, Any]:
        device = next(teacher.parameters()).device
        if not getattr(self.engine, "pool_is_pixels", True):  # a ViT's block inputs: accuracy only
            with frozen_eval(teacher):
                logits = torch.cat([teacher.head(self.engine.pool_features(teacher, images[i : i + 256].to(device)))
                                    .cpu() for i in range(0, len(images), 256)])
            return {"teacher_accuracy": 100.0 * float((logits.argmax(1) == labels).float().mean()),
                    "bn_distance": None, "feature_distance": None}
        with frozen_eval(teacher):
            logits = torch.cat([teacher(images[i : i + 256].to(device)).cpu() for i in range(0, len(images), 256)])
            teacher_accuracy = 100.0 * float((logits.argmax(1) == labels).float().mean())
            subset = images[torch.randperm(len(images))[: self.metric_batch]].to(device)
            with BNStatistics(teacher) as bn:
                teacher(subset)
                bn_distance = float(bn.kl()) if len(bn) else None
            real = torch.cat([x for x, _ in context.datamodule.plain_train_dataloader()])
            task_classes = torch.unique(torch.cat([y for _, y in context.datamodule.plain_train_dataloader()]))
            synthetic = images[torch.isin(labels, task_classes)]
            feature_distance = None
            if len(synthetic) > 1:
                feature_distance = frechet_distance(batched_features(teacher, synthetic),
                                                    batched_features(teacher, real))
        return {"teacher_accuracy": teacher_accuracy, "bn_distance": bn_distance,
                "feature_distance": feature_distance}

    def save_grid(self, context: TaskContext, per_class: int = 8) -> Path:
        import torchvision

        mean = torch.tensor(context.mean).view(1, -1, 1, 1)
        std = torch.tensor(context.std).view(1, -1, 1, 1)
        picks = torch.cat([(self.labels == c).nonzero().flatten()[:per_class] for c in self.labels.unique()])
        images = (self.images[picks] * std + mean).clamp(0, 1)
        if images.shape[-1] < 32:
            images = torch.nn.functional.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
        path = context.run_dir / "inversion" / f"task_{context.task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(images, path, nrow=per_class, padding=2, pad_value=1.0)
        return path

    def log_record(self, context: TaskContext, record: dict[str, Any], grid_path: Path | None) -> None:
        logger = context.logger
        if not logger:
            return
        scalars = {f"inversion/{k}": float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and v is not None and k != "task"}
        logger.log_metrics(scalars, step=context.task)
        for point in self.engine.stats.curve:
            logger.log_metrics({f"inversion_task_{context.task}/{k}": v for k, v in point.items() if k != "step"},
                               step=int(point["step"]))
        if grid_path is not None:
            from cl_inversion.utils.logging_utils import log_image

            log_image(logger, f"inversion/task_{context.task}", grid_path, step=context.task)

    def results(self) -> dict[str, Any]:
        return {"inversion": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "engine": self.engine.state_dict(), "images": self.images,
                "labels": self.labels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"]
        self.engine.load_state_dict(state["engine"])
        self.images, self.labels = state["images"], state["labels"]

    def on_restore(self, method: ReplayStudent, is_last: bool) -> None:
        """The replay again, from the restored synthetic set; the teacher is the method's frozen model as the
        checkpoint restored it (what the loop hands `between_tasks` as `TaskContext.teacher`)."""
        if self.images is not None and not is_last:
            method.receive_replay(self.engine.replay(frozen_teacher(method.previous, method), self.images,
                                                     self.labels))


def frozen_teacher(teacher: nn.Module | None, method: ReplayStudent) -> nn.Module:
    """The teacher to invert; a student that keeps no frozen model of its last task has none to give."""
    if teacher is None:
        raise TypeError(f"{type(method).__name__} keeps no frozen model of the task just learned to invert "
                        "(a replaying student sets keeps_previous_model = True, as InversionStudent does)")
    return teacher
