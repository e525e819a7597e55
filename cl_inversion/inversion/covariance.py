"""REMIX's structured covariance of BatchNorm inputs (Krukowski et al. 2026), from its authors' code.

Reference: pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at f2cb098, `resnet32/inversion/lcm.py` (`LCM`),
`resnet32/utils.py` (`fit_lcm_correlation`), `resnet32/continual_runner/task_contrastive_cl_runner.py`
(`update_buffer_params`: the streaming covariance of each BN layer's input over the task's training images, its
correlation, the old/new blend) and `resnet32/inversion/class_wise_image_for_contrastive.py`
(`DeepInversionLaplaceHook.nll`).

  Σ_model = diag(softplus(u) + ε) + (w wᵀ) ⊙ K,   K_ij = exp(−|a_i − a_j|),   R = Σ_model / (σ σᵀ), diag R = 1
The correlation R is fitted (Adam, MSE) to the observed correlation of a layer's input; the NLL of a synthetic
batch uses Σ = R ⊙ (s sᵀ) + 1e-5·I with s² = the layer's running variance + 1e-5, against the running mean:
  NLL = ½ (C log 2π + log det Σ + tr(Σ⁻¹ S)) / C,   S = the batch's mean per-image covariance about the running mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LaplaceCovariance(nn.Module):
    """`LCM`: a C×C covariance from 3C parameters (u, w, a)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.u_raw = nn.Parameter(torch.zeros(dim))
        self.w = nn.Parameter(torch.ones(dim) * 0.1)
        self.a = nn.Parameter(torch.linspace(-1, 1, dim))

    def laplace_kernel(self) -> Tensor:
        return torch.exp(-torch.abs(self.a[:, None] - self.a[None, :]))

    def covariance(self) -> Tensor:
        u = F.softplus(self.u_raw) + self.eps
        return torch.diag(u) + self.laplace_kernel() * torch.outer(self.w, self.w)

    def correlation(self) -> Tensor:
        sigma = self.covariance()
        std = torch.sqrt(torch.diag(sigma))
        r = sigma / torch.clamp(torch.outer(std, std), min=self.eps)
        return r - torch.diag(torch.diag(r)) + torch.eye(self.dim, device=r.device)

    def fit(self, target: Tensor, epochs: int = 200, lr: float = 0.01) -> None:
        """`fit_lcm_correlation`: Adam on (a, w, u) minimising MSE(correlation, target)."""
        optimizer = torch.optim.Adam([self.a, self.w, self.u_raw], lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                optimizer.zero_grad()
                F.mse_loss(self.correlation(), target).backward()
                optimizer.step()


class StreamingCovariance:
    """The running mean and sum of squared deviations of C-channel vectors, merged batch by batch (the runner's
    hook: every pixel of a BN input is one sample)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().float()
        x = x.permute(0, *range(2, x.dim()), 1).reshape(-1, x.shape[1])
        if self.mean is None:
            self.mean = torch.zeros(x.shape[1], device=x.device)
            self.m2 = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        batch_mean = x.mean(0)
        diff = x - batch_mean
        delta = batch_mean - self.mean
        total = self.n + len(x)
        self.mean = self.mean + delta * (len(x) / total)
        self.m2 = self.m2 + diff.T @ diff + torch.outer(delta, delta) * (self.n * len(x) / total)
        self.n = total

    def correlation(self) -> Tensor:
        """Σ = M2 / (n − 1 + 1e-6) + 1e-6·I, divided by σ σᵀ, unit diagonal."""
        sigma = self.m2 / (self.n - 1 + 1e-6) + torch.eye(len(self.m2), device=self.m2.device) * 1e-6
        std = torch.sqrt(torch.diagonal(sigma))
        r = sigma / (std.unsqueeze(1) * std.unsqueeze(0))
        r.fill_diagonal_(1.0)
        return r


def blended_correlation(model: LaplaceCovariance, observed: Tensor, n_old: int, n_new: int) -> Tensor:
    """The fit target after a task: the observed correlation alone on the first task, else the model's previous
    correlation and the observed one weighted by the old and new classes' shares."""
    if n_old == 0:
        return observed
    with torch.no_grad():
        previous = model.correlation().detach()
    total = n_old + n_new
    return n_old / total * previous + n_new / total * observed


class LaplaceNLL:
    """`DeepInversionLaplaceHook`: a forward hook on a BatchNorm layer; `nll()` scores the batch that entered it
    under Σ = R ⊙ (s sᵀ) + 1e-5·I, s² = running variance + 1e-5 (Cholesky factor, log-determinant and precision
    computed once, at construction)."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, model: LaplaceCovariance) -> None:
        self.layer = layer
        self.value: Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)
        with torch.no_grad():
            std = torch.sqrt(layer.running_var.float() + 1e-5)
            sigma = model.correlation() * (std.unsqueeze(1) * std.unsqueeze(0))
            sigma = sigma + torch.eye(len(sigma), device=sigma.device) * 1e-5
            cholesky = torch.linalg.cholesky(sigma)
            self.logdet = 2 * torch.log(torch.diagonal(cholesky)).sum()
            self.precision = torch.cholesky_inverse(cholesky).contiguous()

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.value = inputs[0]

    def nll(self) -> Tensor:
        x = self.value.float()
        mean = self.layer.running_mean.float()
        c = x.shape[1]
        if x.dim() == 4:
            b, _, h, w = x.shape
            diff = (x - mean.view(1, c, 1, 1)).reshape(b, c, -1)
            scatter = torch.bmm(diff, diff.transpose(1, 2)).div(h * w).mean(0)
        else:
            diff = x - mean.view(1, c)
            scatter = diff.T @ diff / len(x)
        mahalanobis = (self.precision * scatter).sum()
        return 0.5 * (c * math.log(2 * math.pi) + self.logdet + mahalanobis) / c

    def remove(self) -> None:
        self.handle.remove()
        self.value = None
