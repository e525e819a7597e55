"""REMIX's covariance model against its authors' code (pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at
f2cb098, `resnet32/inversion/lcm.py`, `resnet32/utils.py` `fit_lcm_correlation`, the runner's covariance hook,
`class_wise_image_for_contrastive.py` `DeepInversionLaplaceHook`), each formula written out by hand here."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cl_inversion.inversion.covariance import (
    LaplaceCovariance,
    LaplaceNLL,
    StreamingCovariance,
    blended_correlation,
)

RTOL = 1e-6


def perturbed(dim: int = 6, seed: int = 0) -> LaplaceCovariance:
    torch.manual_seed(seed)
    model = LaplaceCovariance(dim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double()


def ref_covariance(u_raw, w, a, eps=1e-6):
    """`LCM.covariance`: diag(softplus(u) + eps) + (w w^T) * exp(-|a_i - a_j|), element by element."""
    c = len(a)
    sigma = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            sigma[i, j] = w[i] * w[j] * math.exp(-abs(a[i] - a[j]))
        sigma[i, i] += math.log1p(math.exp(u_raw[i])) + eps
    return sigma


def test_laplace_covariance_and_correlation_are_lcms():
    model = perturbed()
    u, w, a = (p.detach().numpy() for p in (model.u_raw, model.w, model.a))
    sigma = ref_covariance(u, w, a)
    assert np.allclose(model.covariance().detach().numpy(), sigma, rtol=RTOL)
    std = np.sqrt(np.diag(sigma))
    r = sigma / np.maximum(np.outer(std, std), 1e-6)
    np.fill_diagonal(r, 1.0)
    assert np.allclose(model.correlation().detach().numpy(), r, rtol=RTOL)
    assert [p.numel() for p in model.parameters()] == [6, 6, 6]  # 3C parameters, not C²
    fresh = LaplaceCovariance(4)
    assert torch.equal(fresh.a.detach(), torch.linspace(-1, 1, 4))
    assert torch.allclose(fresh.w.detach(), torch.full((4,), 0.1))


def test_fit_is_fit_lcm_correlation():
    target = torch.eye(5, dtype=torch.float64) * 0.5 + 0.5
    ours, ref = perturbed(5, 1), perturbed(5, 1)
    ours.fit(target, epochs=7, lr=0.01)
    optimizer = torch.optim.Adam([ref.a, ref.w, ref.u_raw], lr=0.01)
    for _ in range(7):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ref.correlation(), target).backward()
        optimizer.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=RTOL)
    before = torch.nn.functional.mse_loss(perturbed(5, 1).correlation(), target)
    assert torch.nn.functional.mse_loss(ours.correlation(), target) < before


def test_streaming_covariance_is_one_pass_over_every_pixel():
    torch.manual_seed(2)
    batches = [torch.randn(n, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.0 for n in (5, 2, 7)]
    stream = StreamingCovariance()
    for x in batches:
        stream.update(x)
    pixels = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 3) for x in batches]).double().numpy()
    n = len(pixels)
    m2 = (pixels - pixels.mean(0)).T @ (pixels - pixels.mean(0))
    assert stream.n == n and np.allclose(stream.m2.numpy(), m2, rtol=1e-4)
    sigma = m2 / (n - 1 + 1e-6) + np.eye(3) * 1e-6
    std = np.sqrt(np.diag(sigma))
    r = sigma / np.outer(std, std)
    np.fill_diagonal(r, 1.0)
    assert np.allclose(stream.correlation().numpy(), r, rtol=1e-4)


def test_blend_weights_old_and_new_classes():
    model = perturbed(4).float()
    observed = torch.eye(4) * 0.3 + 0.7
    assert torch.equal(blended_correlation(model, observed, 0, 10), observed)
    expected = 20 / 30 * model.correlation().detach() + 10 / 30 * observed
    assert torch.allclose(blended_correlation(model, observed, 20, 10), expected, rtol=RTOL)


def test_nll_is_the_laplace_hooks():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) + 0.5)
    model = perturbed(6)
    hook = LaplaceNLL(bn, model)
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    bn.eval()
    bn(x)
    got = hook.nll()
    hook.remove()
    # by hand: Sigma = R * (s s^T) + 1e-5 I, s^2 = running_var + 1e-5; S = mean over images of the per-image
    # covariance about the running mean; NLL = 0.5 (C log 2pi + log det Sigma + tr(Sigma^-1 S)) / C
    r = model.correlation().detach().numpy()
    s = np.sqrt(bn.running_var.numpy() + 1e-5)
    sigma = r * np.outer(s, s) + np.eye(6) * 1e-5
    d = (x - bn.running_mean.view(1, 6, 1, 1)).numpy().reshape(4, 6, 9)
    scatter = np.mean([di @ di.T / 9 for di in d], axis=0)
    expected = 0.5 * (6 * math.log(2 * math.pi) + np.linalg.slogdet(sigma)[1]
                      + np.trace(np.linalg.inv(sigma) @ scatter)) / 6
    assert math.isclose(float(got), expected, rel_tol=RTOL)
