"""Variational Data-Free Knowledge Distillation (Li et al., TPAMI 2023), without the optional
self-supervised term.

Reference: XiaorongLi-95/VDFD, `classification/class_incremental/agents/vdfd.py` (class `VDFD`: the
stored terms, `calculate_importance`, `svd`, `comp_GW`, `reg_loss`, `com_prototype`,
`init_model_optimizer`), `agents/vdfd_la.py` (local cross-entropy), `agents/agent.py` (`with_head`
false: backbone only; optimiser, GCN and prototypes reset at every task), `models/gcn.py` (the GCN and
its A + I normalisation) and `scripts/vdfd.sh` (the CIFAR-100 settings).

Keeping the outputs of old classes close to the previous network's is distillation; VDFD does it without
data or a stored network through a first-order Taylor expansion: the change of a class's mean output is
≈ gᵀ(θ − θ*). While learning a task the loss is

    local CE  +  reg_coef · Σ_i [ (G_iθ − G_iθ*_i)ᵀ P_i (G_iθ − G_iθ*_i)  +  log(1 / det(P_i + eps·I)) ]

summed over the earlier tasks i, with, as in the reference:

* **G_i, per-output-node gradients compressed across classes.** At the end of task i, for each of its
  classes c, the gradient of the batch-mean output c (network in eval mode) w.r.t. each regularised
  tensor, averaged over the output node's fan-in (conv: mean over in×kh×kw; linear: over inputs; 1-D
  tensors as they are), then averaged over the batches of the task's data. Per tensor this gives a
  [nodes, classes] matrix, compressed to rank 1 by `torch.svd_lowrank(q=1)`: `u·s` [nodes] and `v`
  [classes]. G_iθ for class c is Σ_tensors Σ_nodes (u·s)_o v_c · Σ_(fan-in) θ[o, ...] (`comp_GW`).
* **θ*_i** the weights at the end of task i; G_iθ*_i is computed once then (`GWstar`).
* **P_i, one precision matrix per task**, from a 2-layer GCN over that task's classes: nodes are the
  unit-normalised head rows of task i (taken at the start of the current task, `com_prototype`),
  affinity A their cosine similarity, Â = D^-½ (A + I) D^-½, `out = Linear₂(Â · ReLU(Linear₁(Â X))) + X`
  (hidden = feature width, 512 on ResNet-18, with biases), rows of `out` normalised to N, P = N Nᵀ
  (unit diagonal). The GCN is re-initialised at the start of every task and learned jointly.
* **Backbone only** (the reference's `with_head` false); `regularise_head` adds the head.
* Local cross-entropy over the current task's outputs (`vdfd_la.py`, temperature 1 as `--temp 1`).
* The bias-free head of the reference (`nn.Linear(n_feat, out_dim, bias=False)` in `agent.py`) with
  `head_bias: false`.
* Per-group optimisation (`init_model_optimizer`): backbone, head and GCN each their own lr and weight
  decay (`backbone_lr`, `head_lr`, `gcn_lr`, `*_weight_decay`; null keeps the run's optimizer value),
  built by `configure_optimizers` with `optimizer_class` (e.g. `torch.optim.Adam`) when set.

Deliberate differences (the paper's equation where the reference's code does something else):

1. The per-task terms are **summed** over earlier tasks; the reference's `reg_loss` overwrites its
   accumulator (`reg_loss = task_reg_loss`), so only the last old task is regularised.
2. The quadratic is the **square** (GW − GW*)ᵀP(GW − GW*). The reference builds GW as a
   [task_count, classes] matrix with identical rows and sums the expanded `t²a − 2tb + c`
   (t = number of old tasks), which is not a square (and can be negative) for t ≥ 2; at t = 1 the two agree.
3. log(1/det) via `slogdet` (the same value as the reference's `(1/det).log()`, stable in float32).
4. The gradients are taken over the task's plain (un-augmented, unshuffled) training images; the
   reference iterates its augmented training loader. Averaging per batch then over batches as it does.
5. The reference's single Adam for the network and a second Adam for the GCN, both ×0.5 at the same
   milestones, are one optimizer with three parameter groups here (Adam is per-parameter: the same update).
6. `reanchor` (off by default, the reference's behaviour) recomputes G_iθ*_i at every later task end,
   distilling from the previous network instead of the one that learned task i; `normalize` (off)
   scales each task's compressed gradient to unit norm (for SGD). Neither is in the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from torch import Tensor, nn

from cl_inversion.methods.base import ContinualModule, state_bytes
from cl_inversion.utils.nn_utils import eval_mode


def node_average(grad: Tensor) -> Tensor:
    """A tensor's gradient averaged over each output node's fan-in: [shape[0]] (1-D tensors unchanged).
    Reference: `calculate_importance` (`p.grad.mean([1,2,3])` for conv, `.mean(dim=1)` for linear)."""
    return grad.reshape(grad.shape[0], -1).mean(1) if grad.dim() > 1 else grad.clone()


def node_sums(weight: Tensor) -> Tensor:
    """Σ over each output node's fan-in of the weights: [shape[0]] (1-D tensors unchanged). With a
    gradient constant over the fan-in, ⟨g, θ⟩ = Σ_o ḡ_o · Σ_fan-in θ[o, …] (`comp_GW`)."""
    return weight.reshape(weight.shape[0], -1).sum(1) if weight.dim() > 1 else weight


def compress(per_class: Tensor, niter: int = 2) -> tuple[Tensor, Tensor]:
    """Rank-1 factors of a [nodes, classes] matrix across classes: (u·s [nodes], v [classes]) with
    M ≈ (u·s) vᵀ (reference `svd`: `torch.svd_lowrank(M, q=1)`, its default niter 2).
    A zero matrix gives zero factors."""
    if not per_class.any():
        return per_class.new_zeros(per_class.shape[0]), per_class.new_zeros(per_class.shape[1])
    u, s, v = torch.svd_lowrank(per_class, q=1, niter=niter)
    return u[:, 0] * s[0], v[:, 0]


def linearised(u: Tensor, v: Tensor, weight: Tensor) -> Tensor:
    """G θ for one tensor and one task: v_c · Σ_o u_o · Σ_fan-in θ[o, …], a vector over the task's classes."""
    return (u @ node_sums(weight)) * v


def normalized_adjacency(affinity: Tensor) -> Tensor:
    """D^-½ (A + I) D^-½, D the row sums of A + I (reference `models/gcn.py` `preprocess_adj`; an inf
    from a non-positive degree is set to 0 there: NaN → 0 here likewise)."""
    a_hat = affinity + torch.eye(len(affinity), dtype=affinity.dtype, device=affinity.device)
    d = a_hat.sum(1).pow(-0.5)
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    return d[:, None] * a_hat * d[None, :]


class GCN(nn.Module):
    """Two graph-convolution layers with biases and a residual: Linear₂(Â · ReLU(Linear₁(Â X))) + X,
    hidden width = feature width (reference `models/gcn.py`, built with hid_dim = n_feat, dropout 0).

    `precision(prototypes)`: A = X Xᵀ of the unit head rows X, rows of the output normalised, P = N Nᵀ."""

    def __init__(self, features: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or features
        self.layer1 = nn.Linear(features, hidden)
        self.layer2 = nn.Linear(hidden, features)

    def forward(self, affinity: Tensor, x: Tensor) -> Tensor:
        adjacency = normalized_adjacency(affinity)
        hidden = torch.relu(self.layer1(adjacency @ x))
        return self.layer2(adjacency @ hidden) + x

    def precision(self, prototypes: Tensor) -> Tensor:
        out = F.normalize(self(prototypes @ prototypes.T, prototypes), dim=-1)
        return out @ out.T

    def reset_parameters(self) -> None:
        self.layer1.reset_parameters()
        self.layer2.reset_parameters()


class VDFD(ContinualModule):
    """VDFD: local cross-entropy + the variational regulariser above. No data, no network copy is kept.

    Stored per earlier task i (all in `extra_state()`, see `memory_footprint()`): the rank-1 factors of
    every regularised tensor (`terms[i]["u"][name]` [nodes], `terms[i]["v"][name]` [classes of i]) and
    `terms[i]["anchor"]` = G_iθ*_i [classes of i]; `prototypes[i]`, the unit head rows of task i's
    classes at the start of the current task; the GCN's weights.
    """

    def __init__(self, *args, reg_coef: float = 50.0, eps: float = 1e-3, gcn_hidden: int | None = None,
                 regularise_head: bool = False, head_bias: bool | None = False, normalize: bool = False,
                 reanchor: bool = False, max_grad_batches: int | None = None,
                 optimizer_class: str | None = None,
                 backbone_lr: float | None = None, head_lr: float | None = None, gcn_lr: float | None = None,
                 backbone_weight_decay: float | None = None, head_weight_decay: float | None = None,
                 gcn_weight_decay: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reg_coef = reg_coef
        self.eps = eps
        self.regularise_head = regularise_head
        self.normalize = normalize
        self.reanchor = reanchor
        self.max_grad_batches = max_grad_batches
        self.optimizer_class = optimizer_class
        self.group_settings = {
            "backbone": (backbone_lr, backbone_weight_decay),
            "head": (head_lr, head_weight_decay),
            "gcn": (gcn_lr, gcn_weight_decay)}
        if head_bias is not None and self.net.head.logit_scale is None:
            if self.net.head.slices:
                raise ValueError("method.head_bias must be set before the head has outputs")
            self.net.head.use_bias = head_bias  # the reference's head is bias-free
        self.gcn = GCN(self.net.backbone.feature_dim, gcn_hidden)
        self.terms: list[dict[str, Any]] = []
        self.prototypes: list[Tensor] = []

    # --- the loss ----------------------------------------------------------------------------------
    def regularised_parameters(self) -> dict[str, nn.Parameter]:
        """Backbone tensors (as the reference's `with_head` false), plus the head's with `regularise_head`.
        Keyed by name in `net`; a head slice added after a task has no stored factor and is skipped."""
        return {n: p for n, p in self.net.named_parameters()
                if p.requires_grad and (self.regularise_head or not n.startswith("head."))}

    def task_outputs(self, i: int) -> Tensor:
        """G_iθ: the linearised mean outputs of task i's classes at the current weights."""
        params = self.regularised_parameters()
        term = self.terms[i]
        return sum(linearised(term["u"][n].to(params[n].device), term["v"][n].to(params[n].device), params[n])
                   for n in term["u"])

    def precision(self, i: int) -> Tensor:
        return self.gcn.precision(self.prototypes[i].to(self.device))

    def regulariser(self) -> tuple[Tensor, Tensor]:
        """Σ_i (drift_i)ᵀ P_i drift_i and Σ_i log(1/det(P_i + eps·I)), drift_i = G_iθ − G_iθ*_i."""
        quadratic = log_inv_det = torch.zeros((), device=self.device)
        for i, term in enumerate(self.terms):
            drift = self.task_outputs(i) - term["anchor"].to(self.device)
            precision = self.precision(i)
            eye = torch.eye(len(precision), device=precision.device, dtype=precision.dtype)
            quadratic = quadratic + drift @ precision @ drift
            log_inv_det = log_inv_det - torch.linalg.slogdet(precision + self.eps * eye).logabsdet
        return quadratic, log_inv_det

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        ce = self.local_cross_entropy(self(x), y)
        if not self.terms:
            return {"loss": ce, "ce": ce}
        quadratic, log_det = self.regulariser()
        loss = ce + self.reg_coef * (quadratic + log_det)
        return {"loss": loss, "ce": ce, "quadratic": quadratic, "log_det": log_det}

    # --- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        yield from super().trainable_parameters()
        yield from self.gcn.parameters()

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone, head and GCN groups, each with its lr / weight decay where set (reference
        `init_model_optimizer` and `init_hypermodel_optimizer`)."""
        members = {"backbone": [p for p in self.net.backbone.parameters() if p.requires_grad],
                   "head": [p for p in self.net.head.parameters() if p.requires_grad],
                   "gcn": list(self.gcn.parameters())}
        groups = []
        for name, params in members.items():
            lr, weight_decay = self.group_settings[name]
            group: dict[str, Any] = {"params": params, "name": name}
            if lr is not None:
                group["lr"] = lr
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            if params:
                groups.append(group)
        return groups

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        if self.optimizer_class is not None:
            missing = [g["name"] for g in groups if "lr" not in g]
            if missing:
                raise ValueError(f"method.optimizer_class={self.optimizer_class} needs an lr for every group; "
                                 f"missing: {', '.join(f'method.{m}_lr' for m in missing)}")
            optimizer = get_class(self.optimizer_class)(groups)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # --- between tasks -----------------------------------------------------------------------------
    def on_task_start(self, datamodule: L.LightningDataModule) -> None:
        """As the reference's `train_model` at a new task: fresh GCN, prototypes from the current head."""
        if not self.terms:
            return
        self.gcn.reset_parameters()
        weight = self.net.head.weight.detach()
        bounds = [0, *torch.tensor(self.task_sizes[:-1]).cumsum(0).tolist()]
        self.prototypes = [F.normalize(weight[a:b], dim=1).clone() for a, b in zip(bounds[:-1], bounds[1:])]

    def node_gradients(self, datamodule: L.LightningDataModule) -> dict[str, Tensor]:
        """Per tensor, [nodes, classes of the current task]: the node-averaged gradient of each class's
        batch-mean output, averaged over the batches (reference `calculate_importance`)."""
        params = self.regularised_parameters()
        classes = list(range(self.n_old, self.n_seen))
        grads = {n: p.new_zeros(node_sums(p).shape[0], len(classes)) for n, p in params.items()}
        batches = 0
        with eval_mode(self.net):
            for b, (x, _) in enumerate(datamodule.plain_train_dataloader()):
                if self.max_grad_batches is not None and b >= self.max_grad_batches:
                    break
                mean_output = self.net(x.to(self.device))[:, self.n_old:self.n_seen].mean(0)
                for k in range(len(classes)):
                    per_tensor = torch.autograd.grad(mean_output[k], list(params.values()),
                                                     retain_graph=k < len(classes) - 1, allow_unused=True)
                    for name, g in zip(params, per_tensor):
                        if g is not None:
                            grads[name][:, k] += node_average(g)
                batches += 1
        return {n: g / max(batches, 1) for n, g in grads.items()}

    def on_task_end(self, datamodule: L.LightningDataModule) -> None:
        factors = {n: compress(m) for n, m in self.node_gradients(datamodule).items()}
        u = {n: f[0] for n, f in factors.items()}
        v = {n: f[1] for n, f in factors.items()}
        if self.normalize:  # option: unit ‖G_i‖ over the task (‖u vᵀ‖ = ‖u‖‖v‖)
            norm = sum((u[n].norm() * v[n].norm()) ** 2 for n in u).sqrt().clamp_min(1e-12)
            u = {n: t / norm for n, t in u.items()}
        self.terms.append({"u": u, "v": v, "anchor": torch.zeros(0)})
        with torch.no_grad():
            for i in (range(len(self.terms)) if self.reanchor else [len(self.terms) - 1]):
                self.terms[i]["anchor"] = self.task_outputs(i).detach().clone()

    def memory_footprint(self) -> int:
        """Bytes of the state carried between tasks: every tensor of `extra_state()`."""
        return state_bytes(self.extra_state())

    def extra_state(self) -> dict[str, Any]:
        return {"terms": self.terms, "prototypes": self.prototypes, "gcn": self.gcn.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.terms = [dict(t) for t in state["terms"]]
        self.prototypes = list(state["prototypes"])
        self.gcn.load_state_dict(state["gcn"])
