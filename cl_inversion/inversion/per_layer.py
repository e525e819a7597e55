"""PMI's per-layer model inversion (Tong et al., NeurIPS 2025).

For a batch of target features (sampled from class Gaussians, see `features.py`):
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
    SynthesisProgress,
    SynthesisStats,
    autocast,
    balanced_labels,
    clamp_to,
    cosine_lr,
    frozen_eval,
    gaussian_kl,
    jitter_flip,
    pixel_step,
    total_variation_l2,
)
from cl_inversion.inversion.features import (
    ClassGaussians,
    ContrastiveSelector,
    extract_features,
    fit_selector,
    sample_aligned_features,
)
from cl_inversion.inversion.replay import BufferReplay


def pooled(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def relative_mse(output: Tensor, target: Tensor) -> Tensor:
    """MSE divided by the target's mean square: comparable across blocks whose activations differ in scale."""
    return F.mse_loss(output, target) / (target.pow(2).mean() + 1e-8)


def last_batchnorm(module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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


HINT = "lower inversion.per_layer.lr / layer_lr"


class PerLayerInversion:
    """Synthesis engine: per-layer inversion initialising a short full-model inversion."""

    name = "per_layer"

    def __init__(self, layer_steps: int = 50, full_steps: int = 160, batch_size: int = 256, layer_lr: float = 0.1,
                 lr: float = 0.05, feature_weight: float = 1.0, ce_weight: float = 1.0, bn_weight: float = 10.0,
                 layer_bn_weight: float = 1.0, prior_weight: float = 1.0, tv_weight: float = 2.5e-5, jitter: int = 2,
                 flip: bool = True,
                 covariance: str = "diagonal", oversample: int = 2, bn_loss: str = "kl",
                 first_bn_multiplier: float = 10.0, precision: str = "32", progress: bool = True,
                 log_every: int = 10) -> None:
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
        self.oversample, self.progress, self.log_every = oversample, progress, log_every
        self.gaussians = ClassGaussians(covariance)
        self.selector: ContrastiveSelector | None = None
        self.image_shape: tuple[int, ...] = ()
        self.pixel_range: tuple[Tensor, Tensor] | None = None
        self.stats = SynthesisStats()
        self.last_targets: Tensor | None = None
        self.block_losses: list[tuple[float, float]] = []  # per block: (first, last) reconstruction MSE
        self.step_hook = None  # optional callable(images, step) at the start (step -1) and after each full-model step

    def setup(self, image_shape: Sequence[int], pixel_range: tuple[Tensor, Tensor]) -> None:
        self.image_shape = tuple(image_shape)
        self.pixel_range = pixel_range

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
        self.selector = fit_selector(self.gaussians)

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        missing = [c for c in classes if c not in self.gaussians.mean]
        if missing:
            raise RuntimeError(f"per_layer synthesis: no feature Gaussian for classes {missing} (call observe first)")
        self.stats = SynthesisStats()
        self.block_losses = []
        labels = balanced_labels(classes, n)
        targets = sample_aligned_features(self.gaussians, labels, self.oversample, self.selector)
        self.last_targets = targets
        device = next(teacher.parameters()).device
        chunks = []
        with frozen_eval(teacher):
            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules()):
                self.stats.notes.append("teacher has no BatchNorm layer: BN-statistics and BN-prior terms disabled; "
                                        "the Gaussian feature targets carry the alignment")
            for start in range(0, n, self.batch_size):
                y = labels[start : start + self.batch_size].to(device)
                f = targets[start : start + self.batch_size].to(device)
                image = self.invert_layers(teacher, f)
                chunks.append(self.invert_full(teacher, image, f, y))
        return torch.cat(chunks), labels

    def invert_layers(self, teacher: nn.Module, target_features: Tensor) -> Tensor:
        """Block-wise inversion, last block first; returns the image-level input (with `layer_steps=0`, the
        ablation without the per-layer phase: noise clamped to the pixel range)."""
        blocks = list(teacher.backbone.blocks())
        low, high = (r.to(target_features.device) for r in self.pixel_range)
        if self.layer_steps == 0:
            return clamp_to(torch.randn(len(target_features), *self.image_shape, device=target_features.device),
                            low, high)
        costs = getattr(self, "_block_costs", {})  # one FLOP probe per teacher and batch size, not per batch
        key = (id(teacher), len(target_features))
        if key not in costs:
            probe = torch.zeros(len(target_features), *self.image_shape, device=target_features.device)
            costs = {key: block_costs(blocks, probe)}  # a new teacher drops the old entries
            self._block_costs = costs
        shares, shapes = costs[key]
        relu_inputs = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
        target = target_features
        progress = SynthesisProgress(self.layer_steps * len(blocks), "PMI per-layer", self.stats, self.log_every,
                                     self.progress, engine=self.name, hint=HINT)
        try:
            for k in reversed(range(len(blocks))):
                block, is_image = blocks[k], k == 0
                prior = last_batchnorm(blocks[k - 1]) if k > 0 else None
                if is_image:
                    u = torch.randn(len(target), *shapes[k], device=target.device)
                elif prior is not None:
                    u = prior.bias.view(1, -1, *[1] * (len(shapes[k]) - 1)) + prior.weight.abs().view(
                        1, -1, *[1] * (len(shapes[k]) - 1)) * torch.randn(len(target), *shapes[k], device=target.device)
                else:
                    u = torch.randn(len(target), *shapes[k], device=target.device)
                u = u.detach().requires_grad_(True)
                optimizer = torch.optim.Adam([u], lr=self.layer_lr)
                first = None
                with BNStatistics(block) as bn:
                    for _ in range(self.layer_steps):
                        x = u if is_image or not relu_inputs else F.relu(u)
                        out = block(x)
                        rec = relative_mse(pooled(out) if k == len(blocks) - 1 else out, target)
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
                                u.copy_(clamp_to(u, low, high))
                        first = rec.detach() if first is None else first
                        self.stats.full_model_passes += shares[k]
                        progress.update({"block": k, "rec": rec}, loss)
                self.block_losses.insert(0, (float(first), float(rec.detach())))
                target = (u if is_image or not relu_inputs else F.relu(u)).detach()
        finally:
            progress.close()
        return target

    def invert_full(self, teacher: nn.Module, image: Tensor, target_features: Tensor, labels: Tensor) -> Tensor:
        """Short full-model inversion from the per-layer initialisation."""
        low, high = (r.to(image.device) for r in self.pixel_range)
        x = image.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr, betas=(0.5, 0.9))
        progress = SynthesisProgress(self.full_steps, "PMI full-model", self.stats, self.log_every, self.progress,
                                     engine=self.name, hint=HINT)
        if self.step_hook is not None:
            self.step_hook(x.detach(), -1)
        try:
            with BNStatistics(teacher) as bn:
                for step in range(self.full_steps):
                    cosine_lr(optimizer, self.lr, step, self.full_steps)
                    view = jitter_flip(x, self.jitter, self.flip)
                    with autocast(self.precision, x.device):
                        features = teacher.features(view)
                        logits = teacher.head(features)
                    features, logits = features.float(), logits.float()
                    feat = F.mse_loss(features, target_features)
                    ce = F.cross_entropy(logits, labels)
                    if not len(bn):
                        bn_term = torch.zeros((), device=x.device)
                    elif self.bn_loss == "norm":
                        bn_term = bn.norm_distance(self.first_bn_multiplier)
                    else:
                        bn_term = bn.kl()
                    loss = self.feature_weight * feat + self.ce_weight * ce + self.bn_weight * bn_term
                    if self.tv_weight:
                        loss = loss + self.tv_weight * total_variation_l2(view)
                    pixel_step(optimizer, loss, x, low, high)
                    self.stats.full_model_passes += 1
                    progress.update({"feature": feat, "ce": ce, "bn": bn_term}, loss)
                    if self.step_hook is not None:
                        self.step_hook(x.detach(), step)
        finally:
            progress.close()
        return x.detach()

    def replay(self, teacher: nn.Module, images: Tensor, labels: Tensor) -> BufferReplay:
        return BufferReplay(images, labels)

    def state_dict(self) -> dict:
        return {"gaussians": self.gaussians.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.gaussians.load_state_dict(state["gaussians"])
