"""PMI's per-layer model inversion (Tong et al., NeurIPS 2025).

For a batch of target features (sampled from class Gaussians, see `features.py`; `feature_targets=observed`:
drawn from the features the boundary observed instead — the new classes' real training features and the old
classes' previous synthetic set, the very features the Gaussians summarise — an option of ours, not PMI's):
  1. invert the backbone block by block from the last to the first: each block's *input* is optimised
     so that the block reproduces its target output (relative MSE) with the block's BatchNorm statistics (KL)
     and a prior from the preceding BatchNorm (the input's channel statistics vs N(β, γ²)); the
     optimised input becomes the previous block's target; ~50 cheap steps per block;
  2. the resulting image initialises a short full-model inversion (~160 steps): MSE to the target
     feature + BN KL + cross-entropy to the label + TV prior.
Blocks come from the backbone's `blocks()`; cost is counted in full-model passes, a block step
counting its share of the network's FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cl_inversion.errors import ConfigError
from cl_inversion.inversion.common import (
    PRECISIONS,
    BNStatistics,
    PixelSchedule,
    SynthesisProgress,
    SynthesisStats,
    autocast,
    balanced_labels,
    clamp_to,
    frozen_eval,
    gaussian_kl,
    optimise_pixels,
    retry_on_nan,
    total_variation_l2,
)
from cl_inversion.inversion.engine import EngineBase
from cl_inversion.inversion.features import (
    ClassGaussians,
    ContrastiveSelector,
    extract_features,
    fit_selector,
    sample_aligned_features,
)
from cl_inversion.nn_utils import batchnorm_layers, has_batchnorm


def pooled(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def relative_mse(output: Tensor, target: Tensor) -> Tensor:
    """MSE divided by the target's mean square: comparable across blocks whose activations differ in scale."""
    return F.mse_loss(output, target) / (target.pow(2).mean() + 1e-8)


def last_batchnorm(module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    norms = batchnorm_layers(module)
    return norms[-1] if norms else None


def block_costs(blocks: Sequence[nn.Module], x: Tensor) -> tuple[list[float], list[torch.Size]]:
    """Each block's share of the forward FLOPs of all blocks, and each block's input shape."""
    flops, shapes = [], []
    with torch.no_grad():
        for block in blocks:
            shapes.append(x.shape[1:])
            with FlopCounterMode(display=False) as counter:
                x = block(x)
            flops.append(max(counter.get_total_flops(), 1))
    total = sum(flops)
    return [f / total for f in flops], shapes


def block_start(prior: nn.Module | None, is_image: bool, n: int, shape: torch.Size, device: torch.device) -> Tensor:
    """Where a block's input starts: noise for the image; N(β, γ²) of the preceding BatchNorm otherwise."""
    if is_image or prior is None:
        return torch.randn(n, *shape, device=device)
    view = (1, -1, *[1] * (len(shape) - 1))
    return prior.bias.view(view) + prior.weight.abs().view(view) * torch.randn(n, *shape, device=device)


HINT = "lower inversion.per_layer.lr / layer_lr or set inversion.per_layer.nan_retries"
FEATURE_TARGETS = ("gaussian", "observed")


def observed_targets(features: Tensor, feature_labels: Tensor, labels: Tensor) -> Tensor:
    """Target features for `labels` drawn from the boundary's observed features of each class (the new
    classes' real training features, the old classes' previous synthetic set), without replacement while
    they last."""
    targets = torch.empty(len(labels), features.shape[1])
    for c in labels.unique().tolist():
        where = (labels == c).nonzero().flatten()
        pool = features[feature_labels == c]
        if not len(pool):
            raise RuntimeError(f"per_layer synthesis: no observed feature of class {c} (call observe first)")
        order = torch.cat([torch.randperm(len(pool)) for _ in range(-(-len(where) // len(pool)))])
        targets[where] = pool[order[: len(where)]]
    return targets


class PerLayerInversion(EngineBase):
    """Synthesis engine: per-layer inversion initialising a short full-model inversion."""

    name = "per_layer"

    def __init__(self, layer_steps: int = 50, full_steps: int = 160, batch_size: int = 256, layer_lr: float = 0.1,
                 lr: float = 0.05, feature_weight: float = 1.0, ce_weight: float = 1.0, bn_weight: float = 10.0,
                 layer_bn_weight: float = 1.0, prior_weight: float = 1.0, tv_weight: float = 2.5e-5, jitter: int = 2,
                 flip: bool = True,
                 covariance: str = "diagonal", oversample: int = 2, bn_loss: str = "kl",
                 first_bn_multiplier: float = 10.0, precision: str = "32", nan_retries: int = 0,
                 feature_targets: str = "gaussian", progress: bool = True, log_every: int = 10) -> None:
        super().__init__()
        if str(precision) not in PRECISIONS:
            raise ConfigError(f"inversion.per_layer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.precision = str(precision)
        self.layer_steps, self.full_steps, self.batch_size = layer_steps, full_steps, batch_size
        self.layer_lr, self.lr = layer_lr, lr
        self.feature_weight, self.ce_weight, self.bn_weight = feature_weight, ce_weight, bn_weight
        self.prior_weight, self.tv_weight, self.jitter, self.flip = prior_weight, tv_weight, jitter, flip
        self.layer_bn_weight = layer_bn_weight
        if layer_steps < 0 or full_steps < 0:
            raise ConfigError(f"inversion.per_layer.layer_steps={layer_steps}, full_steps={full_steps}: "
                              "steps must be >= 0 (layer_steps=0: full-model inversion from noise)")
        if bn_loss not in ("kl", "norm"):
            raise ConfigError(f"inversion.per_layer.bn_loss={bn_loss!r}: choose one of kl, norm")
        self.bn_loss, self.first_bn_multiplier = bn_loss, first_bn_multiplier
        if feature_targets not in FEATURE_TARGETS:
            raise ConfigError(f"inversion.per_layer.feature_targets={feature_targets!r}: choose one of "
                              f"{', '.join(FEATURE_TARGETS)}")
        self.feature_targets = feature_targets
        self.observed: tuple[Tensor, Tensor] | None = None  # this boundary's features (feature_targets=observed)
        self.oversample, self.progress, self.log_every = oversample, progress, log_every
        self.nan_retries = nan_retries
        self.gaussians = ClassGaussians(covariance)
        self.selector: ContrastiveSelector | None = None
        self.last_targets: Tensor | None = None
        self.block_losses: list[tuple[float, float]] = []  # per block: (first, last) reconstruction MSE

    def observe(self, teacher: nn.Module, real_batches, replay_images: Tensor | None,
                replay_labels: Tensor | None) -> None:
        """The task boundary's feature model: class Gaussians (new classes on real features, old classes
        re-estimated on the previous synthetic buffer through the new teacher) and the contrastive selector."""
        features, labels = extract_features(teacher, real_batches)
        self.gaussians.fit(features, labels)
        if replay_images is not None:
            old = [(replay_images[i : i + 256], replay_labels[i : i + 256]) for i in range(0, len(replay_labels), 256)]
            old_features, old_labels = extract_features(teacher, old)
            keep = ~torch.isin(old_labels, labels.unique())
            self.gaussians.fit(old_features[keep], old_labels[keep])
            if self.feature_targets == "observed":
                features, labels = torch.cat([features, old_features[keep]]), torch.cat([labels, old_labels[keep]])
        self.observed = (features, labels) if self.feature_targets == "observed" else None
        self.selector = fit_selector(self.gaussians)

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        missing = [c for c in classes if c not in self.gaussians.mean]
        if missing:
            raise RuntimeError(f"per_layer synthesis: no feature Gaussian for classes {missing} (call observe first)")
        self.stats = SynthesisStats()
        self.block_losses = []
        labels = balanced_labels(classes, n)
        if self.observed is not None:
            targets = observed_targets(*self.observed, labels)
        else:
            targets = sample_aligned_features(self.gaussians, labels, self.oversample, self.selector)
        self.last_targets = targets
        device = next(teacher.parameters()).device
        chunks = []
        with frozen_eval(teacher):
            if not has_batchnorm(teacher):
                self.stats.notes.append("teacher has no BatchNorm layer: BN-statistics and BN-prior terms disabled; "
                                        "the Gaussian feature targets carry the alignment")
            for start in range(0, n, self.batch_size):
                y = labels[start : start + self.batch_size].to(device)
                f = targets[start : start + self.batch_size].to(device)
                chunks.append(retry_on_nan(lambda lr, _, f=f, y=y: self.invert_batch(teacher, f, y, lr / self.lr),
                                           self.lr, self.nan_retries, self.stats, f"batch {start // self.batch_size}"))
        return torch.cat(chunks), labels

    def invert_batch(self, teacher: nn.Module, target_features: Tensor, labels: Tensor,
                     lr_scale: float = 1.0) -> Tensor:
        """Per-layer phase, then the full-model phase, both learning rates scaled by `lr_scale` (NaN retries)."""
        image = self.invert_layers(teacher, target_features, self.layer_lr * lr_scale)
        return self.invert_full(teacher, image, target_features, labels, self.lr * lr_scale)

    def invert_layers(self, teacher: nn.Module, target_features: Tensor, layer_lr: float | None = None) -> Tensor:
        """Block-wise inversion, last block first; returns the image-level input (with `layer_steps=0`, the
        ablation without the per-layer phase: noise clamped to the pixel range)."""
        blocks = list(teacher.backbone.blocks())
        low, high = (r.to(target_features.device) for r in self.pixel_range)
        if self.layer_steps == 0:
            return clamp_to(torch.randn(len(target_features), *self.image_shape, device=target_features.device),
                            low, high)
        shares, shapes = self._block_costs_of(teacher, blocks, target_features)
        relu_inputs = has_batchnorm(teacher)
        target = target_features
        progress = SynthesisProgress(self.layer_steps * len(blocks), "PMI per-layer", self.stats, self.log_every,
                                     self.progress, engine=self.name, hint=HINT)
        try:
            for k in reversed(range(len(blocks))):
                prior = last_batchnorm(blocks[k - 1]) if k > 0 else None
                u = block_start(prior, k == 0, len(target), shapes[k], target.device)
                target = self._invert_block(blocks[k], k, len(blocks), u, target, prior, relu_inputs,
                                            self.layer_lr if layer_lr is None else layer_lr, shares[k], (low, high),
                                            progress)
        finally:
            progress.close()
        return target

    def _block_costs_of(self, teacher: nn.Module, blocks: list[nn.Module], target: Tensor):
        """One FLOP probe per teacher and batch size, not per batch (a new teacher drops the old entries)."""
        costs = getattr(self, "_block_costs", {})
        key = (id(teacher), len(target))
        if key not in costs:
            probe = torch.zeros(len(target), *self.image_shape, device=target.device)
            costs = {key: block_costs(blocks, probe)}
            self._block_costs = costs
        return costs[key]

    def _invert_block(self, block: nn.Module, k: int, n_blocks: int, u: Tensor, target: Tensor,
                      prior: nn.Module | None, relu_inputs: bool, lr: float, share: float,
                      pixel_box: tuple[Tensor, Tensor], progress: SynthesisProgress) -> Tensor:
        """Optimise block k's input `u` so the block reproduces `target` (relative MSE + the block's BN KL +
        the preceding BN's prior on u, or TV and the pixel box for the image); returns the block's input."""
        is_image = k == 0
        u = u.detach().requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=lr)
        first = None
        with BNStatistics(block) as bn:
            for _ in range(self.layer_steps):
                x = u if is_image or not relu_inputs else F.relu(u)
                out = block(x)
                rec = relative_mse(pooled(out) if k == n_blocks - 1 else out, target)
                loss = rec + (self.layer_bn_weight * bn.kl() if len(bn) else 0.0)
                if prior is not None and not is_image:
                    dims = [0] + list(range(2, u.dim()))
                    loss = loss + self.prior_weight * gaussian_kl(
                        prior.bias, prior.weight.pow(2), u.mean(dims), u.var(dims, unbiased=False)).mean()
                if is_image:
                    loss = loss + self.tv_weight * total_variation_l2(u)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if is_image:
                    with torch.no_grad():
                        u.copy_(clamp_to(u, *pixel_box))
                first = rec.detach() if first is None else first
                self.stats.full_model_passes += share
                progress.update({"block": k, "rec": rec}, loss)
        self.block_losses.insert(0, (float(first), float(rec.detach())))
        return (u if is_image or not relu_inputs else F.relu(u)).detach()

    def invert_full(self, teacher: nn.Module, image: Tensor, target_features: Tensor, labels: Tensor,
                    lr: float | None = None) -> Tensor:
        """Short full-model inversion from the per-layer initialisation (DeepInversion's loop, PMI's loss)."""
        x = image.clone().requires_grad_(True)
        progress = SynthesisProgress(self.full_steps, "PMI full-model", self.stats, self.log_every, self.progress,
                                     engine=self.name, hint=HINT)
        schedule = PixelSchedule(self.full_steps, self.lr if lr is None else lr, (0.5, 0.9), True, self.jitter,
                                 self.flip)
        with BNStatistics(teacher) as bn:
            return optimise_pixels(x, lambda view: self.full_loss(teacher, bn, view, target_features, labels),
                                   schedule, self.pixel_range, self.stats, progress, self.step_hook)

    def full_loss(self, teacher: nn.Module, bn: BNStatistics, view: Tensor, target_features: Tensor,
                  labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE to the sampled feature + cross-entropy to the label + BN statistics + TV prior."""
        with autocast(self.precision, view.device):
            features = teacher.features(view)
            logits = teacher.head(features)
        features, logits = features.float(), logits.float()
        feat = F.mse_loss(features, target_features)
        ce = F.cross_entropy(logits, labels)
        if not len(bn):
            bn_term = torch.zeros((), device=view.device)
        elif self.bn_loss == "norm":
            bn_term = bn.norm_distance(self.first_bn_multiplier)
        else:
            bn_term = bn.kl()
        loss = self.feature_weight * feat + self.ce_weight * ce + self.bn_weight * bn_term
        if self.tv_weight:
            loss = loss + self.tv_weight * total_variation_l2(view)
        return loss, {"feature": feat, "ce": ce, "bn": bn_term}

    def state_dict(self) -> dict:
        return {"gaussians": self.gaussians.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.gaussians.load_state_dict(state["gaussians"])
