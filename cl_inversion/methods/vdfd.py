"""Variational Data-Free Knowledge Distillation (Li et al., TPAMI 2023), without the optional
self-supervised term.

Keeping the outputs of old classes close to the previous network's is distillation; VDFD does it without
data or a stored network through a first-order Taylor expansion: the change of class c's mean output is
≈ g_cᵀ(θ − θ*), g_c the gradient of that mean output at the old weights θ*. While learning a task the loss is

    local CE  +  reg_coef · [ (Gθ − Gθ*)ᵀ P (Gθ − Gθ*)  +  log(1 / det(P + eps·I)) ]

with G the stacked per-class gradients, each compressed to rank 1 per parameter tensor, and P a matrix over
old-class outputs produced by a two-layer GCN over the cosine affinity of the old classes' head vectors.
The GCN is learned jointly with the network; the log-det term keeps P from collapsing to 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.methods.base import ContinualModule, state_bytes


def rank1(grad: Tensor, niter: int = 4) -> tuple[Tensor, Tensor]:
    """Rank-1 factors (u·s, v) of `grad` reshaped to [shape[0], rest], so grad ≈ (u·s) vᵀ.

    1-D tensors (biases, BN affine) are a single column and are kept exactly (v = [1]); a zero gradient
    (e.g. another task's head slice) gives zero factors."""
    matrix = grad.detach().reshape(grad.shape[0], -1)
    if matrix.shape[1] == 1:
        return matrix[:, 0].clone(), torch.ones(1, dtype=grad.dtype, device=grad.device)
    if not matrix.any():
        return torch.zeros(matrix.shape[0], dtype=grad.dtype, device=grad.device), \
            torch.zeros(matrix.shape[1], dtype=grad.dtype, device=grad.device)
    u, s, v = torch.svd_lowrank(matrix, q=1, niter=niter)
    return u[:, 0] * s[0], v[:, 0]


def bilinear(u: Tensor, v: Tensor, weight: Tensor) -> Tensor:
    """⟨u_c v_cᵀ, W⟩ = u_cᵀ W v_c for each row c of `u` [n, rows] and `v` [n, cols], W reshaped to [rows, cols]."""
    return ((u @ weight.reshape(u.shape[1], -1)) * v).sum(1)


def normalized_affinity(vectors: Tensor) -> Tensor:
    """D^-½ A D^-½ with A the cosine similarity of the vectors clamped at 0 (its diagonal 1 is the self-loop)."""
    unit = F.normalize(vectors, dim=1)
    affinity = (unit @ unit.T).clamp_min(0)
    d = affinity.sum(1).rsqrt()
    return d[:, None] * affinity * d[None, :]


class GCN(nn.Module):
    """Two-layer graph convolution over the classes' affinity graph; node features are the head vectors.

    Returns P = H Hᵀ with H's rows (node embeddings, plus a residual of the unit head vectors so P starts
    near their cosine similarity) normalised: a correlation matrix (PSD, unit diagonal).
    The unit diagonal bounds the objective below — with a single mean-output vector per class an
    unconstrained precision would grow without limit along directions of no drift."""

    def __init__(self, in_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.layer1 = nn.Linear(in_features, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, in_features, bias=False)

    def forward(self, vectors: Tensor) -> Tensor:
        adjacency = normalized_affinity(vectors)
        hidden = torch.relu(adjacency @ self.layer1(vectors))
        embedding = F.normalize(adjacency @ self.layer2(hidden) + F.normalize(vectors, dim=1), dim=1)
        return embedding @ embedding.T


class VDFD(ContinualModule):
    """VDFD: local cross-entropy + the variational regulariser above. No data, no network copy is kept.

    Stored between tasks (all in `extra_state()`, see `memory_footprint()`):
      * `factors[name] = (U, V)`: per parameter tensor, the rank-1 factors of every seen class's gradient,
        U [n_classes, shape[0]] (u·s) and V [n_classes, numel / shape[0]];
      * `anchor`: Gθ*, one scalar per class, computed from the factors so the drift is exactly 0 at θ*;
      * `class_vectors`: the head's weight rows of the seen classes (node features of the GCN's graph);
      * the GCN's weights.

    g_c is the gradient of class c's logit averaged over the training data of the task that introduced c
    (all of that task's images, network in eval mode), taken at the end of that task; later tasks have no
    data for c, so its factors stay as stored. With `reanchor` (default) Gθ* of every stored class is
    recomputed with the weights at the end of each task, i.e. the regulariser distils from the previous
    network as in the paper; without it each class stays anchored at the weights it was learned with.

    With `normalize` (default) each class's compressed gradient is scaled to unit norm, so the drift is a
    displacement along ĝ_c: raw gradients of trained classes have ‖g‖² ~ 500 on digits and the quadratic
    diverges under SGD (lr 0.05) at any weight ≥ 1; the paper pairs raw gradients and weight 50 with Adam.
    """

    def __init__(self, *args, reg_coef: float = 1.0, eps: float = 1e-3, gcn_hidden: int = 32,
                 normalize: bool = True, reanchor: bool = True, max_grad_batches: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reg_coef = reg_coef
        self.normalize = normalize
        self.eps = eps
        self.reanchor = reanchor
        self.max_grad_batches = max_grad_batches
        self.gcn = GCN(self.net.backbone.feature_dim, gcn_hidden)
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.anchor = torch.zeros(0)
        self.class_vectors = torch.zeros(0)

    # --- the loss ----------------------------------------------------------------------------------
    def linearised_outputs(self) -> Tensor:
        """Gθ: ⟨ĝ_c, θ⟩ for every stored class, from the rank-1 factors (no full gradient is built)."""
        params = dict(self.net.named_parameters())
        return sum(bilinear(u.to(params[n].device), v.to(params[n].device), params[n])
                   for n, (u, v) in self.factors.items())

    def regulariser(self) -> tuple[Tensor, Tensor]:
        """(drift)ᵀ P (drift) and log(1/det(P + eps·I)), drift = Gθ − Gθ*, P from the GCN."""
        drift = self.linearised_outputs() - self.anchor.to(self.device)
        precision = self.gcn(self.class_vectors.to(self.device))
        quadratic = drift @ precision @ drift
        eye = torch.eye(len(precision), device=precision.device, dtype=precision.dtype)
        log_inv_det = -torch.linalg.slogdet(precision + self.eps * eye).logabsdet
        return quadratic, log_inv_det

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        ce = self.local_cross_entropy(self(x), y)
        if not self.factors:
            return {"loss": ce, "ce": ce}
        quadratic, log_det = self.regulariser()
        loss = ce + self.reg_coef * (quadratic + log_det)
        return {"loss": loss, "ce": ce, "quadratic": quadratic, "log_det": log_det}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        yield from super().trainable_parameters()
        yield from self.gcn.parameters()

    # --- between tasks -----------------------------------------------------------------------------
    def mean_output_gradients(self, datamodule: L.LightningDataModule) -> dict[int, dict[str, Tensor]]:
        """∂ mean_x f_c(x) / ∂θ for each class c of the current task, over the task's training images."""
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        classes = range(self.n_old, self.n_seen)
        grads = {c: {n: torch.zeros_like(p) for n, p in params.items()} for c in classes}
        was_training = self.net.training
        self.net.eval()
        seen = 0
        for i, (x, _) in enumerate(datamodule.plain_train_dataloader()):
            if self.max_grad_batches is not None and i >= self.max_grad_batches:
                break
            logits = self.net(x.to(self.device))
            seen += len(x)
            for c in classes:
                for (name, _), g in zip(params.items(), torch.autograd.grad(
                        logits[:, c].sum(), list(params.values()), retain_graph=True, allow_unused=True)):
                    if g is not None:
                        grads[c][name] += g
        self.net.train(was_training)
        return {c: {n: g / max(seen, 1) for n, g in per_class.items()} for c, per_class in grads.items()}

    def on_task_end(self, datamodule: L.LightningDataModule) -> None:
        grads = self.mean_output_gradients(datamodule)
        n_stored = len(self.anchor)
        compressed = {c: {n: rank1(g) for n, g in per_class.items()} for c, per_class in grads.items()}
        if self.normalize:  # unit ‖ĝ_c‖ (‖u vᵀ‖ = ‖u‖‖v‖): the drift becomes a displacement along ĝ_c
            for per_class in compressed.values():
                norm = sum((u.norm() * v.norm()) ** 2 for u, v in per_class.values()).sqrt().clamp_min(1e-12)
                per_class.update({n: (u / norm, v) for n, (u, v) in per_class.items()})
        for name in grads[self.n_old]:
            u = torch.stack([compressed[c][name][0] for c in compressed])
            v = torch.stack([compressed[c][name][1] for c in compressed])
            empty = (u.new_zeros(n_stored, u.shape[1]), v.new_zeros(n_stored, v.shape[1]))  # a tensor new this task
            old_u, old_v = self.factors.get(name, empty)
            self.factors[name] = (torch.cat([old_u.to(u.device), u]), torch.cat([old_v.to(v.device), v]))
        with torch.no_grad():
            current = self.linearised_outputs().detach()
        self.anchor = current if self.reanchor else torch.cat([self.anchor.to(current.device), current[n_stored:]])
        self.class_vectors = self.net.head.weight[: self.n_seen].detach().clone()

    def memory_footprint(self) -> int:
        """Bytes of the state carried between tasks: every tensor of `extra_state()`."""
        return state_bytes(self.extra_state())

    def extra_state(self) -> dict[str, Any]:
        return {"factors": self.factors, "anchor": self.anchor, "class_vectors": self.class_vectors,
                "gcn": self.gcn.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.factors = dict(state["factors"])
        self.anchor, self.class_vectors = state["anchor"], state["class_vectors"]
        self.gcn.load_state_dict(state["gcn"])
