"""PMI's class-wise feature model ("CFS"): per-class Gaussians over the teacher's pooled penultimate
features, one small contrastive encoder per class, and the iterative contrastive selection that draws the
target features the per-layer inversion inverts towards.

A port of the authors' code, RuilinTong/PMI-CFS-DFCL @ 2913603f, `ResNet-32/continual_runner/
class_wise_contrastive_buffer.py` (`prepare_out_features`, `SimpleMLPEncoder`, `SelectContrastiveLoss`,
`train_contrastive_model`, `contrastive_selection`, `random_selection`,
`ClassWiseContrastiveBuffer.generate_features`), plus `NegativeContrastiveLoss`, which that commit ships
only as bytecode and is read from the fork pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel @ d1f7f86,
`ResNet-32/backbone/vaes.py`. Published settings: blocks 2, lr 1e-2, 200 epochs, tau 1.0, leaky ReLU,
selection step 40, keep rate 0.5.

Everything here runs on the CPU (features are small) and draws from torch's global RNG only, so a seeded
run is reproducible.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.nn_utils import eval_mode

SELECTIONS = ("contrastive", "random")
RESCALES = ("reference", "standardise")
ACTIVATIONS = ("leaky", "relu")


def _choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"inversion.per_layer.{field}={value!r}: choose one of {', '.join(allowed)}")


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
    """Per class, the mean and the biased standard deviation (no epsilon) of its features, float32 [dim].

    Reference: `prepare_out_features` (`np.mean`, `np.std` per class) and `random_selection`
    (`eps * std + mean`). Statistics are accumulated in float64 and stored as float32.
    """

    def __init__(self) -> None:
        self.mean: dict[int, Tensor] = {}
        self.std: dict[int, Tensor] = {}

    @property
    def classes(self) -> list[int]:
        return sorted(self.mean)

    def fit(self, features: Tensor, labels: Tensor) -> None:
        """(Re-)estimate the classes present in `labels`; the other classes are kept."""
        features, labels = features.detach().cpu(), labels.detach().cpu()
        for c in labels.unique().tolist():
            f = features[labels == c].double()
            self.mean[int(c)] = f.mean(0).float()
            self.std[int(c)] = f.std(0, correction=0).float()

    def sample(self, c: int, n: int) -> Tensor:
        """`n` features of class `c`: randn(n, dim) * std + mean (reference: `random_selection`)."""
        return torch.randn(n, len(self.mean[c])) * self.std[c] + self.mean[c]

    def state_dict(self) -> dict:
        return {"mean": {c: t.clone() for c, t in self.mean.items()},
                "std": {c: t.clone() for c, t in self.std.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mean = {int(c): t.detach().float().cpu().clone() for c, t in state["mean"].items()}
        self.std = {int(c): t.detach().float().cpu().clone() for c, t in state["std"].items()}


class ContrastiveEncoder(nn.Module):
    """`blocks` × [Linear(d, d), BatchNorm1d(d), LeakyReLU (or ReLU)], then each row divided by its
    L2 norm + 1e-6. Reference: `SimpleMLPEncoder` (act_type 'leaky' → LeakyReLU, otherwise ReLU)."""

    def __init__(self, in_features: int, blocks: int = 2, activation: str = "leaky") -> None:
        super().__init__()
        _choice("activation", activation, ACTIVATIONS)
        self.in_features, self.blocks, self.activation = in_features, blocks, activation
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(in_features, in_features), nn.BatchNorm1d(in_features),
                       nn.LeakyReLU() if activation == "leaky" else nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def config(self) -> dict:
        """What rebuilds this encoder's architecture (its parameters come from `state_dict`)."""
        return {"in_features": self.in_features, "blocks": self.blocks, "activation": self.activation}

    def forward(self, x: Tensor) -> Tensor:
        y = self.layers(x)
        return y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + 1e-6)


def negative_contrastive_loss(z: Tensor, tau: float = 1.0) -> Tensor:
    """Mean over rows of log(mean over columns of exp(z zᵀ / tau)); `z` [N, d] already normalised.
    Every other feature of the class is a negative (the diagonal is the positive pair).
    Reference: `NegativeContrastiveLoss.forward` (fork's `ResNet-32/backbone/vaes.py`)."""
    cos = z @ z.T / tau
    return torch.log(torch.exp(cos).mean(1)).mean()


def selection_scores(candidates_z: Tensor, selected_z: Tensor, tau: float = 1.0) -> Tensor:
    """Per candidate [N], the mean over the selected [M] of (candidate · selected) / tau; lower is more
    distinct from what is already selected. Reference: `SelectContrastiveLoss.forward`."""
    return (candidates_z @ selected_z.T / tau).mean(1)


def train_contrastive_encoder(features: Tensor, blocks: int = 2, lr: float = 1e-2, epochs: int = 200,
                              tau: float = 1.0, batch_size: int = 64,
                              activation: str = "leaky") -> ContrastiveEncoder:
    """Train one class's encoder with the negative contrastive loss; returns the best copy, in eval mode.

    Reference: `train_contrastive_model`. Batches of min(`batch_size`, n) features, reshuffled each epoch,
    the last incomplete batch dropped; Adam(`lr`), encoder in train mode. A NaN loss ends that epoch (no
    step). After each step, if that step's loss (computed before the step) is the lowest so far, a deep copy
    of the encoder (after the step, with its BN running statistics) is kept. Returned: the last kept copy, or
    the encoder itself if no step was taken. The reference shuffles with a DataLoader (a sampler seeded from
    the global RNG); here each epoch's order is `torch.randperm(n)` from the global RNG directly.
    Needs at least 2 features (BatchNorm in train mode cannot take a batch of one).
    """
    n = len(features)
    if n < 2:
        raise ValueError(f"train_contrastive_encoder: needs at least 2 features, got {n}")
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().float().cpu().clone()
        encoder = ContrastiveEncoder(x.shape[1], blocks, activation)
        encoder.train()
        optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
        size = min(batch_size, n)
        best_loss: float | None = None
        best: ContrastiveEncoder | None = None
        for _ in range(epochs):
            order = torch.randperm(n)
            for start in range(0, n - size + 1, size):
                loss = negative_contrastive_loss(encoder(x[order[start:start + size]]), tau)
                if bool(torch.isnan(loss)):
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                value = loss.item()
                if best_loss is None or value < best_loss:
                    best_loss, best = value, copy.deepcopy(encoder)
    return (encoder if best is None else best).eval()


@torch.no_grad()
def contrastive_selection(encoder: nn.Module, mean: Tensor, std: Tensor, n: int, batch_size: int,
                          keep_rate: float = 0.5, tau: float = 1.0, rescale: str = "reference") -> Tensor:
    """`n` features [n, d] of one class, drawn batch by batch so each batch is far from those kept so far.

    Reference: `contrastive_selection` (with `cur_feats=None`). Steps = ceil(n / batch_size). The first step
    keeps min(batch_size, n) draws randn * std + mean as they are. Each further step draws
    int(batch_size / keep_rate) candidates (batch_size if keep_rate <= 0), scores them with
    `selection_scores(encoder(candidates), encoder(all kept so far), tau)` and keeps the
    min(batch_size, n - kept) lowest (ties by index; the reference's `np.argsort` leaves their order open).
    The encoder is used in eval mode, as the reference's trained encoder is.

    Then the reference's compensation of the set's statistics, with m, s the set's mean and unbiased std and
    scale = std / (s + 1e-8):
    - `rescale="reference"`: (f + (mean - m)) * scale, the reference's arithmetic; its mean is mean * scale,
      not the class mean;
    - `rescale="standardise"`: (f - m) * scale + mean, which gives the class mean and std.
    With n == 1 the unbiased std is undefined (the reference yields NaN): the compensation is skipped.
    """
    _choice("rescale", rescale, RESCALES)
    if batch_size < 1:
        raise ValueError(f"contrastive_selection: batch_size={batch_size} must be at least 1")
    if keep_rate > 1:
        raise ValueError(f"contrastive_selection: keep_rate={keep_rate} must be at most 1 (fewer than n would "
                         "be kept)")
    mean, std = mean.reshape(-1).float().cpu(), std.reshape(-1).float().cpu()
    dim = len(mean)
    if n <= 0:
        return torch.empty(0, dim)
    candidates = int(batch_size / keep_rate) if keep_rate > 0 else batch_size
    kept = torch.randn(min(batch_size, n), dim) * std + mean
    with eval_mode(encoder):
        for _ in range(math.ceil(n / batch_size) - 1):
            draws = torch.randn(candidates, dim) * std + mean
            scores = selection_scores(encoder(draws), encoder(kept), tau)
            chosen = torch.argsort(scores, stable=True)[:min(batch_size, n - len(kept))]
            kept = torch.cat([kept, draws[chosen]])
            if len(kept) == n:
                break
    if n > 1:
        m, s = kept.mean(0), kept.std(0)
        scale = std / (s + 1e-8)
        kept = (kept + (mean - m)) * scale if rescale == "reference" else (kept - m) * scale + mean
    return kept


class FeatureModel:
    """Class Gaussians plus one contrastive encoder per class; `sample` draws labelled target features.

    Reference: `ClassWiseContrastiveBuffer` (`update_buffer` fits statistics and trains one encoder per
    class; `generate_features` samples). Settings as in the reference's `cont_params`: `blocks`, `lr`,
    `epochs`, `tau`, `activation`, `batch_size` (of encoder training), `select_step` (`slt_step`),
    `keep_rate` (`slt_rate`, used as min(keep_rate, 1)); `selection` is the reference's `feat_type`
    ('contrastive' = 'cont', 'random' = plain Gaussian draws); `rescale`: see `contrastive_selection`.
    """

    def __init__(self, blocks: int = 2, lr: float = 1e-2, epochs: int = 200, tau: float = 1.0,
                 batch_size: int = 64, activation: str = "leaky", select_step: int = 40, keep_rate: float = 0.5,
                 selection: str = "contrastive", rescale: str = "reference") -> None:
        _choice("selection", selection, SELECTIONS)
        _choice("rescale", rescale, RESCALES)
        _choice("activation", activation, ACTIVATIONS)
        for field, value in (("blocks", blocks), ("batch_size", batch_size), ("select_step", select_step)):
            if value < 1:
                raise ConfigError(f"inversion.per_layer.{field}={value}: must be at least 1")
        if epochs < 0:
            raise ConfigError(f"inversion.per_layer.epochs={epochs}: must be at least 0")
        self.blocks, self.lr, self.epochs, self.tau = blocks, lr, epochs, tau
        self.batch_size, self.activation = batch_size, activation
        self.select_step, self.keep_rate = select_step, keep_rate
        self.selection, self.rescale = selection, rescale
        self.gaussians = ClassGaussians()
        self.encoders: dict[int, ContrastiveEncoder] = {}

    @property
    def classes(self) -> list[int]:
        return self.gaussians.classes

    def fit(self, features: Tensor, labels: Tensor) -> None:
        """Fit the Gaussians of the classes present and train one encoder per class (in class order).

        A class with fewer than 2 features gets a Gaussian only (its old encoder, if any, is dropped) and is
        then sampled at random. With `selection="random"` no encoder is trained (none would be used; the
        reference trains them regardless). Classes not present keep their Gaussian and encoder.
        """
        features, labels = features.detach().float().cpu(), labels.detach().cpu()
        self.gaussians.fit(features, labels)
        for c in sorted(labels.unique().tolist()):
            own = features[labels == c]
            if len(own) < 2 or self.selection == "random":
                self.encoders.pop(int(c), None)
                continue
            self.encoders[int(c)] = train_contrastive_encoder(
                own, blocks=self.blocks, lr=self.lr, epochs=self.epochs, tau=self.tau,
                batch_size=self.batch_size, activation=self.activation)

    def sample_class(self, c: int, k: int) -> Tensor:
        """`k` features of class `c`: contrastive selection with batch max(k // select_step, 2), or plain
        Gaussian draws (`selection="random"`, or no encoder for `c`). Reference: the per-class body of
        `generate_features`."""
        if self.selection == "contrastive" and c in self.encoders:
            return contrastive_selection(self.encoders[c], self.gaussians.mean[c], self.gaussians.std[c], k,
                                         batch_size=max(k // self.select_step, 2),
                                         keep_rate=min(self.keep_rate, 1.0), tau=self.tau, rescale=self.rescale)
        return self.gaussians.sample(c, k)

    def sample(self, n: int, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
        """`n` target features [n, d] and their labels [n], shuffled together.

        Reference: `generate_features`. Labels are drawn uniformly over `classes` (the reference: over all
        classes seen, with numpy; here `torch.randint`), counted per class, each class sampled by
        `sample_class` in order of first appearance among the draws, then one random permutation
        (`torch.randperm`; the reference: `random.shuffle`) is applied to features and labels.
        """
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"FeatureModel.sample: classes must be non-empty and distinct, got {classes}")
        missing = sorted(set(classes) - set(self.gaussians.mean))
        if missing:
            raise ValueError(f"FeatureModel.sample: no feature statistics for classes {missing} (call fit first)")
        draws = torch.tensor(classes)[torch.randint(len(classes), (n,))].tolist()
        counts: dict[int, int] = {}
        for c in draws:
            counts[c] = counts.get(c, 0) + 1
        dim = len(self.gaussians.mean[classes[0]])
        if n <= 0:
            return torch.empty(0, dim), torch.empty(0, dtype=torch.long)
        feats = torch.cat([self.sample_class(c, k) for c, k in counts.items()])
        labels = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in counts.items()])
        order = torch.randperm(n)
        return feats[order], labels[order]

    def sample_per_class(self, k: int, classes: Sequence[int], boost: int = 1) -> tuple[Tensor, Tensor]:
        """`k` target features of every class of `classes`, shuffled together with their labels.

        Reference: PMI's CLIP learner, REMIX fork at d1f7f86, `CLIP/models/moe_adapter.py` `build_inv_data`
        (`feat_type: cont`) with `CLIP/inversion/cont_model.py` `contrastive_selection`: per class, the selection
        of k·`boost` features in batches of max(int(k·boost // select_step), 1), then k of them at random
        (`random.sample`; here `torch.randperm`); one permutation of all (`random.shuffle`).
        """
        feats, labels = [], []
        for c in [int(c) for c in classes]:
            if self.selection == "contrastive" and c in self.encoders:
                pool = contrastive_selection(self.encoders[c], self.gaussians.mean[c], self.gaussians.std[c], k * boost,
                                             batch_size=max(k * boost // self.select_step, 1),
                                             keep_rate=min(self.keep_rate, 1.0), tau=self.tau, rescale=self.rescale)
                feats.append(pool[torch.randperm(len(pool))[:k]] if boost > 1 else pool)
            else:
                feats.append(self.gaussians.sample(c, k))
            labels.append(torch.full((k,), c, dtype=torch.long))
        order = torch.randperm(k * len(labels))
        return torch.cat(feats)[order], torch.cat(labels)[order]

    def state_dict(self) -> dict:
        """Gaussians and every encoder (architecture and parameters); the settings come from the config."""
        return {"gaussians": self.gaussians.state_dict(),
                "encoders": {c: {**e.config(), "state": {k: v.clone() for k, v in e.state_dict().items()}}
                             for c, e in self.encoders.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore Gaussians and encoders (rebuilt in eval mode, without drawing from the global RNG)."""
        self.gaussians.load_state_dict(state["gaussians"])
        self.encoders = {}
        for c, entry in state["encoders"].items():
            with torch.random.fork_rng(devices=[]):  # building the layers would draw their initial weights
                encoder = ContrastiveEncoder(entry["in_features"], entry["blocks"], entry["activation"])
            encoder.load_state_dict(entry["state"])
            self.encoders[int(c)] = encoder.eval()
