"""Class-wise feature modelling for PMI: per-class Gaussians over penultimate features and a small
contrastive model that keeps the most class-distinctive of over-sampled candidates.

This is PMI's "feature alignment": synthetic images are inverted towards features drawn from the
real-feature distribution of their class, not only towards a label.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.nn_utils import eval_mode


@torch.no_grad()
def extract_features(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Penultimate (pooled) features and labels of `batches`, teacher in eval mode."""
    device = next(net.parameters()).device
    feats, labels = [], []
    with eval_mode(net):
        for x, y in batches:
            feats.append(net.features(x.to(device)).float().cpu())
            labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


class ClassGaussians:
    """One Gaussian per class over features: diagonal covariance by default, full as an option."""

    def __init__(self, covariance: str = "diagonal", eps: float = 1e-4) -> None:
        if covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance={covariance!r}: choose 'diagonal' or 'full'")
        self.covariance = covariance
        self.eps = eps
        self.mean: dict[int, Tensor] = {}
        self.cov: dict[int, Tensor] = {}  # variances (diagonal) or covariance matrices (full)

    def fit(self, features: Tensor, labels: Tensor) -> None:
        """(Re-)estimate the Gaussians of the classes present in `labels`; others are kept."""
        for c in labels.unique().tolist():
            f = features[labels == c].double()
            self.mean[c] = f.mean(0).float()
            if self.covariance == "diagonal":
                self.cov[c] = (f.var(0, unbiased=len(f) > 1) + self.eps).float()
            else:
                centred = f - f.mean(0)
                cov = centred.T @ centred / max(len(f) - 1, 1)
                self.cov[c] = (cov + self.eps * torch.eye(f.shape[1], dtype=f.dtype)).float()

    def std(self, c: int) -> Tensor:
        return self.cov[c].sqrt() if self.covariance == "diagonal" else self.cov[c].diagonal().sqrt()

    def sample(self, c: int, n: int) -> Tensor:
        if self.covariance == "diagonal":
            return self.mean[c] + torch.randn(n, len(self.mean[c])) * self.cov[c].sqrt()
        dist = torch.distributions.MultivariateNormal(self.mean[c], covariance_matrix=self.cov[c])
        return dist.sample((n,))

    def state_dict(self) -> dict:
        return {"covariance": self.covariance, "mean": self.mean, "cov": self.cov}

    def load_state_dict(self, state: dict) -> None:
        self.covariance, self.mean, self.cov = state["covariance"], state["mean"], state["cov"]


class ContrastiveSelector(nn.Module):
    """MLP with an L2-normalised output and one learnable prototype per class, trained to tell classes
    apart; a candidate's score is its probability of belonging to its own class."""

    def __init__(self, feature_dim: int, classes: Sequence[int], hidden: int = 128, out: int = 64,
                 temperature: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))
        self.classes = list(classes)  # class id of each prototype
        self.prototypes = nn.Parameter(torch.randn(len(self.classes), out))
        self.temperature = temperature

    def logits(self, features: Tensor) -> Tensor:
        z = F.normalize(self.mlp(features), dim=1)
        return z @ F.normalize(self.prototypes, dim=1).T / self.temperature

    def fit(self, features: Tensor, labels: Tensor, steps: int = 200, lr: float = 1e-2) -> None:
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        mean, std = features.mean(0), features.std(0) + 1e-6
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        for _ in range(steps):
            loss = F.cross_entropy(self.logits((features - mean) / std), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def score(self, features: Tensor, labels: Tensor) -> Tensor:
        probs = F.softmax(self.logits((features - self.mean) / self.std), dim=1)
        return probs.gather(1, labels[:, None]).squeeze(1)


def fit_selector(gaussians: ClassGaussians, classes: list[int] | None = None, samples_per_class: int = 64,
                 steps: int = 200) -> ContrastiveSelector:
    """Train the contrastive model on Gaussian samples of `classes` (default: every modelled class).
    Done once per task boundary (PMI's class-wise feature modelling), not once per synthesised batch."""
    classes = sorted(gaussians.mean) if classes is None else list(classes)
    fit_x = torch.cat([gaussians.sample(c, samples_per_class) for c in classes])
    fit_y = torch.arange(len(classes)).repeat_interleave(samples_per_class)
    selector = ContrastiveSelector(fit_x.shape[1], classes)
    with torch.enable_grad():
        selector.fit(fit_x, fit_y, steps=steps)
    return selector


def sample_aligned_features(gaussians: ClassGaussians, labels: Tensor, oversample: int = 2,
                            selector: ContrastiveSelector | None = None, selector_steps: int = 200) -> Tensor:
    """Target features for `labels`: `oversample`× candidates per class from its Gaussian, the most
    distinctive kept by the contrastive selector (fitted here if none is given, or if it lacks a class),
    then re-standardised to the class mean and std."""
    classes = labels.unique().tolist()
    if selector is None or not set(classes) <= set(selector.classes):
        selector = fit_selector(gaussians, classes, steps=selector_steps)
    dim = len(gaussians.mean[classes[0]])
    targets = torch.empty(len(labels), dim)
    for c in classes:
        where = (labels == c).nonzero().flatten()
        k = len(where)
        candidates = gaussians.sample(c, oversample * k)
        own = torch.full((len(candidates),), selector.classes.index(c))
        chosen = candidates[selector.score(candidates, own).topk(k).indices]
        if k > 1:
            chosen = (chosen - chosen.mean(0)) / (chosen.std(0) + 1e-6) * gaussians.std(c) + gaussians.mean[c]
        targets[where] = chosen
    return targets
