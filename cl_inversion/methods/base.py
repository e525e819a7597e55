"""`ContinualModule`: the part of every method that is not its loss.

The task loop calls `begin_task` (grows the head, runs `on_task_start`) before a task's `Trainer.fit`
and `end_task` (runs `on_task_end`, the between-task hook) after it. A method overrides `loss` and,
where it needs one, the two hooks; state a hook creates that must survive a resume goes through
`extra_state` / `load_extra_state`.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.models.head import IncrementalClassifier

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class ContinualModule(L.LightningModule):
    """Base class of all methods: owns the network, the task bookkeeping, logging and optimisers."""

    #: train on the union of all tasks seen so far (the joint upper bound) instead of the current task
    uses_all_data: bool = False
    #: keep a frozen copy of the network after each task as `self.previous` (distillation, inversion teacher)
    keeps_previous_model: bool = False

    def __init__(self, net: IncrementalClassifier, optimizer: OptimizerFactory,
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.task = -1
        self.task_sizes: list[int] = []
        self.is_last_task = False
        self.previous: nn.Module | None = None  # frozen model after the previous task, where a method keeps one

    # --- bookkeeping -------------------------------------------------------------------------------
    @property
    def n_seen(self) -> int:
        """Classes seen so far, including the current task's (outputs 0..n_seen-1)."""
        return sum(self.task_sizes)

    @property
    def n_old(self) -> int:
        """Classes of earlier tasks (outputs 0..n_old-1)."""
        return sum(self.task_sizes[:-1])

    def begin_task(self, task_index: int, n_new_classes: int, datamodule: L.LightningDataModule,
                   is_last: bool = False) -> None:
        self.task = task_index
        self.is_last_task = is_last
        self.task_sizes.append(n_new_classes)
        if datamodule is not None and hasattr(datamodule, "task_class_names"):  # a scenario's TaskDataModule
            self.net.grow(n_new_classes, datamodule.task_class_names, datamodule.normalization)
        else:
            self.net.grow(n_new_classes)
        self.on_task_start(datamodule)

    def end_task(self, datamodule: L.LightningDataModule) -> None:
        if self.keeps_previous_model:
            self.previous = self.frozen_copy()
        self.on_task_end(datamodule)

    def restore(self, task_sizes: list[int], task: int, net_state: dict[str, Any], state: dict[str, Any],
                is_last: bool = False) -> None:
        """On resume: back to the state after `task` (the head regrown to `task_sizes` before the weights load)."""
        for size in task_sizes:
            self.net.head.grow(size)
        self.task_sizes, self.task, self.is_last_task = list(task_sizes), task, is_last
        self.net.load_state_dict(net_state)
        self.restore_state(state)

    def restore_state(self, state: dict[str, Any]) -> None:
        """On resume, once `net` has its weights back: method state, and the previous model (which is the
        network as checkpointed after the task)."""
        self.load_extra_state(state)
        if self.keeps_previous_model:
            self.previous = self.frozen_copy()

    def on_task_start(self, datamodule: L.LightningDataModule) -> None:
        """Hook before training a task (the head already has the new outputs)."""

    def on_task_end(self, datamodule: L.LightningDataModule) -> None:
        """Between-task hook, after training a task and before its evaluation and checkpoint."""

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond `net` that a checkpoint must carry (e.g. a Fisher matrix)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of `extra_state`; called on resume after `net` has its weights back."""

    def carried_state_bytes(self) -> int:
        """Memory carried across a task boundary besides the network: method state + a kept previous model."""
        previous = state_bytes(self.previous.state_dict()) if self.previous is not None else 0
        return state_bytes(self.extra_state()) + previous

    def frozen_copy(self) -> nn.Module:
        """A frozen copy of the current network, e.g. as the previous model to distil from."""
        previous = copy.deepcopy(self.net).eval()
        previous.requires_grad_(False)
        return previous

    # --- training ----------------------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor) -> Tensor | dict[str, Tensor] | None:
        """The method's training loss on one batch; a dict must hold the total under "loss"; None skips
        the step."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        out = self.loss(x, y)
        if out is None:  # the method trains nothing on this step (Lightning skips the optimiser step)
            return None
        terms = out if isinstance(out, dict) else {"loss": out}
        self.log_dict({f"task_{self.task}/{k}": v.detach() for k, v in terms.items()},
                      on_step=False, on_epoch=True, prog_bar=False, batch_size=len(y), sync_dist=True)
        self.log("loss", terms["loss"].detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        return terms["loss"]

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def teardown(self, stage: str) -> None:
        """A `ddp_spawn` worker is a fresh process per fit: release its process group before it exits.
        Left alive, gloo's threads can abort the exiting worker (SIGABRT, "terminate called without an
        active exception") and fail the task. The main process keeps its group for the next task."""
        if (stage == "fit" and multiprocessing.parent_process() is not None and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # --- shared loss pieces ------------------------------------------------------------------------
    def seen_cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy over all classes seen so far (task-agnostic)."""
        return F.cross_entropy(logits[:, : self.n_seen], y)

    def class_balance(self, targets: Tensor) -> Tensor:
        """Per-sample weights giving each class an equal share of the batch's weight. ABD (`learners/datafree.py`
        `AlwaysBeDreaming.update_model`, `mappings` / `rnt`) weighs its half-real (new classes), half-synthetic
        (old) batch with n_old/n_seen per old-class sample and n_new/n_seen per new-class one; other
        compositions (`replay_ratio`) are scaled by half the batch over each group's size."""
        old_share = self.n_old / self.n_seen
        is_old = targets < self.n_old
        n_old_samples = int(is_old.sum())
        half = len(targets) / 2
        old_weight = old_share * half / max(n_old_samples, 1)
        new_weight = (1.0 - old_share) * half / max(len(targets) - n_old_samples, 1)
        return torch.where(is_old, old_weight, new_weight)

    def local_cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy over the current task's outputs only (labels shifted to that slice)."""
        return F.cross_entropy(logits[:, self.n_old : self.n_seen], y - self.n_old)


def state_bytes(state: Any) -> int:
    """Bytes of every tensor in a (nested dict/list/tuple) state, e.g. a method's `extra_state()`."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                 t_squared: bool = False) -> Tensor:
    """Knowledge distillation: soft cross-entropy at temperature T, summed over classes, averaged over
    the batch; unnormalised as ABD's baselines (GT-RIPL/AlwaysBeDreaming-DFCIL `learners/default.py`
    `loss_fn_kd`: its `* T**2` is commented out). `t_squared=True` is Hinton et al.'s T² scaling."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    loss = -(q * log_p).sum(dim=1).mean()
    return loss * temperature**2 if t_squared else loss
