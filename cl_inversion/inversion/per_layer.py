"""PMI's per-layer model inversion (Tong et al., NeurIPS 2025), as its authors' code does it.

Reference: RuilinTong/PMI-CFS-DFCL at 2913603, `ResNet-32/inversion/class_wise_image_for_contrastive.py`
(`ClassWiseContrastiveInversion.layer_wise_inversion_for_cl`, `inversion`, `init_layer_input`, `KLDivergence`,
`WarmupScheduler`) and `continual_runner/class_wise_contrastive_buffer.py` (`generate_data_by_selection`);
the BN hook `ModifiedBNInputHook` and the block list `get_all_blocks` are `.pyc` there and read from the
REMIX fork (pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at d1f7f86, `inversion/functions.py`,
`backbone/resnet_cifar.py`).

For target features drawn per class (`features.py`: class Gaussians + contrastive selection):
  1. per block, last to first (a ResNet-32: 16 blocks, the stem and every residual block): the block's
     input u is optimised (Adam, `layer_lr`, `layer_steps`) so that the block — the last one followed by
     average pooling — reproduces its target:
        α_mse·MSE(block(u), target) + α_bn·Σ_BN-in-block KL(batch ‖ running) + α_in·KL(u ‖ N(β, γ²))
     with α_bn = α_in = `bn_weight · n_blocks · layer_bn_factor` (0.25 · 16 · 20), u started at N(β, γ²) of the
     preceding block's last BatchNorm (the image: N(0, 1), no prior); the kept iterate becomes the previous
     block's target;
  2. from that image, `full_steps` steps of the whole network at `lr` (5 warm-up steps, ×`lr_decay` at
     `milestones`): α_mse·MSE(pooled feature, target) + α_bn·Σ_all-BN KL(batch ‖ running), α_bn = `bn_weight`.
In both phases a weight doubles (capped) at every step whose term is above its first value (`boost`), and the
iterate after the step with the lowest MSE + base-weighted statistics loss is kept (`keep_best`).
No cross-entropy, no image prior, no jitter or flip; images are not clamped.

`laplace_weight` > 0 is REMIX (pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at f2cb098,
`resnet32/inversion/class_wise_image_for_contrastive.py`, `continual_runner/task_contrastive_cl_runner.py`): at each
boundary a Laplace-kernel covariance per BatchNorm layer is fitted to the correlation of the layer's input on the
real training images (blended with the previous fit by the old/new class shares, `covariance.py`), and both phases
add `laplace_weight` × the mean over the BN layers in scope of its NLL (not boosted; counted in the kept loss).

`statistics=data` is PMI's CLIP inversion (pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at d1f7f86,
`CLIP/inversion/layer_wise_clip_inversion.py` `LayerWiseCLIPInversion.layer_wise_inversion_for_cl`, `inversion`,
`init_layer_input`, `get_block_inv_settings`; `CLIP/models/moe_adapter.py` `incremental_train`, `build_inv_data`):
the blocks are the vision transformer's split (patch convolution, token embedding, residual blocks, class-token
projection), the statistics those of real block inputs per token position (`tokens.py`), collected at each boundary
through the model of the boundary before (`stats_source=previous`) and pooled over boundaries. Blocks from the last
down to `start_block` are inverted: MSE(block(u), target) + α·Σ KL(attention / MLP inputs ‖ data) + α·KL(u ‖ data),
α = `bn_weight · n_blocks · layer_bn_factor`, u started at N(data); the kept iterate is the best for blocks above the
start, the start block's (`start_steps`, `start_lr`) begins at `start_image_size`'s patch grid and doubles
(bicubic, Adam restarted) at `start_upsample`, fed to the block resized to the full grid. Then the full-model phase
from the start block in batches of `batch_size`: MSE + `bn_weight`·Σ_residual-block-input KL +
`input_tv_weight`·TV(u), Adam under a cosine (`cosine_period`). The pool holds the start block's inputs.
Targets: `per_class` per seen class, each class's CFS over `per_class · boost_rate` candidates then `per_class`
at random; old classes' Gaussians are kept (`refit_old=false`).

Options of ours, reference values by default: `block_mse=relative` (MSE / the target's mean square),
`ce_weight`/`tv_weight` > 0 (cross-entropy to the label and DeepInversion's TV prior in the full phase),
`feature_targets=observed` (the observed features instead of Gaussian samples), `search=true` (the
reference's optional per-block lr / weight search), `precision=bf16-mixed`, `nan_retries`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cl_inversion.inversion.common import (
    PRECISIONS,
    InputHooks,
    SynthesisProgress,
    SynthesisStats,
    autocast,
    frozen_eval,
    retry_on_nan,
    set_lr,
    total_variation_l2,
)
from cl_inversion.inversion.compiling import check_compile, compiled_teacher
from cl_inversion.inversion.covariance import LaplaceCovariance, LaplaceNLL, StreamingCovariance, blended_correlation
from cl_inversion.inversion.engine import EngineBase
from cl_inversion.inversion.features import FeatureModel, extract_features
from cl_inversion.inversion.graphing import GRAPH_WARMUP_STEPS, StepGraph, adam_update, check_cuda_graph, use_graphs
from cl_inversion.inversion.openset import OpenSetModel
from cl_inversion.inversion.replay import BufferReplay
from cl_inversion.inversion.tokens import (
    StatisticHooks,
    TokenStatistics,
    attention_and_mlp,
    collect,
    position_kl,
    total_variation_4,
    upsample,
)
from cl_inversion.models.moe_clip import is_expert_parameter
from cl_inversion.utils.errors import ConfigError
from cl_inversion.utils.nn_utils import batchnorm_layers

HINT = "lower inversion.per_layer.lr / layer_lr or set inversion.per_layer.nan_retries"
FEATURE_TARGETS = ("gaussian", "observed")
BLOCK_MSE = ("plain", "relative")
STATISTICS = ("batchnorm", "data")
FULL_SCHEDULES = ("warmup_multistep", "cosine")


def kl_to_gaussian(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """KL(N(batch mean, batch var) ‖ N(mean, var)) per channel, averaged over channels: PMI's BN term
    (`ModifiedBNInputHook.stats_regularization`) and input prior (`KLDivergence.compute_loss`), the same
    arithmetic: var_b = biased batch variance + 1e-8,
    ½·mean(log var − log(var_b + 1e-8) − (1 − (var_b + (μ_b − mean)²) / var))."""
    x = x.float()
    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    batch_mean = x.mean(dims)
    batch_var = x.transpose(0, 1).reshape(channels, -1).var(1, unbiased=False) + 1e-8
    r = torch.log(var) - torch.log(batch_var + 1e-8) - (1 - (batch_var + (batch_mean - mean) ** 2) / var)
    return r.mean() * 0.5


def summed_kl(inputs: Sequence[Tensor], means: Sequence[Tensor], variances: Sequence[Tensor]) -> Tensor:
    """Σ over layers of `kl_to_gaussian(input, running mean, running var)`: PMI's BN term summed over its hooks
    (`register_hooks`, `hook_type='kl'`, as `BatchNormInputs` cites)."""
    return torch.stack([kl_to_gaussian(x, m, v) for x, m, v in zip(inputs, means, variances)]).sum()


@functools.cache
def compiled_summed_kl() -> Callable[..., Tensor]:
    """`summed_kl` compiled once per process: a function of tensors only, so every boundary reuses its code."""
    return torch.compile(summed_kl)


class BatchNormInputs(InputHooks):
    """The input of every BatchNorm layer of `net`; `kl()` sums `kl_to_gaussian` against each layer's running
    statistics (PMI's `register_hooks`, `hook_type='kl'`, all layers). `compiled`: the sum runs compiled (its
    per-layer moments fused; eager, it copies every input once more to take its variance)."""

    def __init__(self, net: nn.Module, compiled: bool = False) -> None:
        self.layers = batchnorm_layers(net)
        super().__init__(self.layers)
        self._summed_kl = compiled_summed_kl() if compiled else summed_kl

    def kl(self) -> Tensor:
        means = [layer.running_mean.detach().float() for layer in self.layers]
        variances = [layer.running_var.detach().float() for layer in self.layers]
        return self._summed_kl(self.inputs, means, variances)


def full_phase_lr(step: int, lr: float, warmup: int, milestones: Sequence[int], decay: float) -> float:
    """The lr of full-model step `step` (0-based) under PMI's `WarmupScheduler` around a `MultiStepLR`, stepped
    after every optimiser step: lr/warmup at steps 0 and 1, k·lr/warmup at step k ≤ warmup, then ×`decay` at
    each milestone counted from the end of the warm-up."""
    if step == 0:
        return lr / max(warmup, 1)
    if step <= warmup:
        return lr * step / warmup
    return lr * decay ** sum(1 for m in milestones if m <= step - warmup)


def pooled(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def relative_mse(output: Tensor, target: Tensor) -> Tensor:
    """MSE divided by the target's mean square (an option: comparable across blocks of different scale)."""
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


def block_start(prior: nn.Module | None, n: int, shape: torch.Size,
                device: torch.device) -> tuple[Tensor, Callable | None]:
    """A block's starting input and its prior (`init_layer_input`): N(β, γ²) of the preceding block's last
    BatchNorm (γ as signed in the layer) with KL(u ‖ N(β, γ²)) as prior; N(0, 1) and no prior for the image or
    where no BatchNorm precedes."""
    noise = torch.randn(n, *shape).to(device)
    if prior is None:
        return noise, None
    view = (1, -1, *[1] * (len(shape) - 1))
    gamma, beta = prior.weight.detach().float(), prior.bias.detach().float()
    start = noise * gamma.view(view) + beta.view(view)
    return start, lambda u: kl_to_gaussian(u, beta, gamma.pow(2))


def observed_targets(features: Tensor, feature_labels: Tensor, labels: Tensor) -> Tensor:
    """Target features for `labels` drawn from the boundary's observed features of each class, without
    replacement while they last (the `feature_targets=observed` option)."""
    targets = torch.empty(len(labels), features.shape[1])
    for c in labels.unique().tolist():
        where = (labels == c).nonzero().flatten()
        pool = features[feature_labels == c]
        if not len(pool):
            raise RuntimeError(f"per_layer synthesis: no observed feature of class {c} (call observe first)")
        order = torch.cat([torch.randperm(len(pool)) for _ in range(-(-len(where) // len(pool)))])
        targets[where] = pool[order[: len(where)]]
    return targets


class LoopState:
    """What PMI's loop carries from step to step, on the device and updated in place (a replayed CUDA graph reads
    it where the last step left it): the weights α (mse from 1, bn and in from `weight`), the first step's terms,
    the lowest compared loss and the iterate after that step."""

    def __init__(self, x: Tensor, weight: float) -> None:
        device = x.device
        self.alpha = {"mse": torch.ones((), device=device), "bn": torch.full((), float(weight), device=device),
                      "in": torch.full((), float(weight), device=device)}
        self.first: dict[str, Tensor] = {}
        self.best_loss = torch.full((), float("inf"), dtype=torch.float64, device=device)
        self.best_x = x.detach().clone()

    def weigh(self, terms: dict[str, Tensor], boost: bool, base: float) -> None:
        """The first step records its terms; with `boost`, a later step whose term exceeds its first value doubles
        that term's α, up to 10 (mse), 10·base (bn) and 5·base (in)."""
        if not self.first:
            self.first.update({name: term.detach() for name, term in terms.items()})
        elif boost:
            caps = {"mse": 10.0, "bn": 10 * base, "in": 5 * base}
            for name, alpha in self.alpha.items():
                doubled = (2 * alpha).clamp(max=caps[name])
                alpha.copy_(torch.where(terms[name].detach() > self.first[name], doubled, alpha))

    def keep(self, compared: Tensor, x: Tensor) -> None:
        """Keep `x` (the iterate after the step) and `compared` (its step's loss) if that loss is the lowest yet, on
        the device; a host read only once the input has grown (CLIP's start block, never captured)."""
        better = compared < self.best_loss
        self.best_loss.copy_(torch.where(better, compared, self.best_loss))
        if self.best_x.shape == x.shape:
            self.best_x.copy_(torch.where(better, x, self.best_x))
        elif bool(better):
            self.best_x = x.clone()


def check_options(precision: str, layer_steps: int, full_steps: int, feature_targets: str, block_mse: str,
                  batch_size: int) -> None:
    """The engine's choices and counts, refused with the field and what is allowed."""
    if str(precision) not in PRECISIONS:
        raise ConfigError(f"inversion.per_layer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if layer_steps < 0 or full_steps < 0:
        raise ConfigError(f"inversion.per_layer.layer_steps={layer_steps}, full_steps={full_steps}: "
                          "steps must be >= 0 (layer_steps=0: full-model inversion from noise)")
    if feature_targets not in FEATURE_TARGETS:
        raise ConfigError(f"inversion.per_layer.feature_targets={feature_targets!r}: choose one of "
                          f"{', '.join(FEATURE_TARGETS)}")
    if block_mse not in BLOCK_MSE:
        raise ConfigError(f"inversion.per_layer.block_mse={block_mse!r}: choose one of {', '.join(BLOCK_MSE)}")
    if batch_size < 1:
        raise ConfigError(f"inversion.per_layer.batch_size={batch_size}: must be >= 1")


def check_vit_options(statistics: str, full_schedule: str, start_block: int, cuda_graph: bool | str) -> None:
    if cuda_graph is True and statistics != "batchnorm":
        raise ConfigError(f"cuda_graph=true: the phases of statistics={statistics!r} (a vision transformer) are "
                          "not captured; set cuda_graph=false or auto")
    if statistics not in STATISTICS or full_schedule not in FULL_SCHEDULES:
        raise ConfigError(f"inversion.per_layer.statistics={statistics!r} / full_schedule={full_schedule!r}: "
                          f"choose from {', '.join(STATISTICS)} / {', '.join(FULL_SCHEDULES)}")
    if statistics == "data" and start_block < 1:
        raise ConfigError("inversion.per_layer.start_block must be >= 1 with statistics=data (the reference's "
                          "pixel start block is not ported)")


class PerLayerInversion(EngineBase):
    """Synthesis engine: PMI's per-block inversion initialising a short full-model inversion."""

    name = "per_layer"

    def __init__(self, layer_steps: int = 50, full_steps: int = 160, batch_size: int = 4000, layer_lr: float = 0.8,
                 lr: float = 0.4, bn_weight: float = 0.25, layer_bn_factor: float = 20.0, warmup: int = 5,
                 milestones: Sequence[int] = (80, 120), lr_decay: float = 0.5, boost: bool = True,
                 keep_best: bool = True, search: bool = False, block_mse: str = "plain", ce_weight: float = 0.0,
                 tv_weight: float = 0.0, feature_targets: str = "gaussian", observe_augmented: bool = True,
                 selection: str = "contrastive", rescale: str = "reference", contrastive_blocks: int = 2,
                 contrastive_lr: float = 1e-2, contrastive_epochs: int = 200, contrastive_tau: float = 1.0,
                 select_step: int = 40, keep_rate: float = 0.5, laplace_weight: float = 0.0,
                 laplace_fit_epochs: int = 200, laplace_fit_lr: float = 0.01, precision: str = "32",
                 nan_retries: int = 0, progress: bool = True, log_every: int = 10, statistics: str = "batchnorm",
                 start_block: int = 0, start_steps: int | None = None, start_lr: float | None = None,
                 start_image_size: int | None = None, start_upsample: Sequence[int] = (),
                 layer_batch: int | None = None, full_schedule: str = "warmup_multistep", cosine_period: int = 2000,
                 input_tv_weight: float = 0.0, per_class: int = 0, boost_rate: int = 1, refit_old: bool = True,
                 stats_source: str = "previous", merge_limit: int | None = 14,
                 replay_replacement: bool = False, open_set: dict | None = None, compile: bool | str = "auto",
                 compile_mode: str = "default", cuda_graph: bool | str = "auto") -> None:
        super().__init__()
        #: torch.compile of the full-model phase's teacher (`compiling.py`); `auto` decides per boundary
        self.compile, self.compile_mode = check_compile(compile, compile_mode, self.name), compile_mode
        self.compile_now = False  # this boundary's choice
        #: every phase's step captured in a CUDA graph on a GPU (`graphing.py`); convolutional teachers only
        self.cuda_graph = check_cuda_graph(cuda_graph, compile_mode, self.name)
        self.graphs_now = False  # this boundary's choice
        #: PMI's open-set step on CLIP (`openset.py`): its options, or None
        self.open_set = OpenSetModel(**open_set, merge_limit=merge_limit) if open_set else None
        check_vit_options(statistics, full_schedule, start_block, self.cuda_graph)
        self.statistics, self.start_block = statistics, start_block
        self.start_steps = layer_steps if start_steps is None else start_steps
        self.start_lr = layer_lr if start_lr is None else start_lr
        self.start_image_size, self.start_upsample = start_image_size, list(start_upsample)
        self.layer_batch = layer_batch or batch_size
        self.full_schedule, self.cosine_period, self.input_tv_weight = full_schedule, cosine_period, input_tv_weight
        self.per_class, self.boost_rate, self.refit_old = per_class, boost_rate, refit_old
        self.stats_source, self.replay_replacement = stats_source, replay_replacement
        self.token_stats = TokenStatistics(merge_limit)
        self.stats_backbone: nn.Module | None = None  # the model the next boundary's data statistics go through
        self._stats_experts: dict[str, Tensor] | None = None  # its expert weights from a checkpoint
        check_options(precision, layer_steps, full_steps, feature_targets, block_mse, batch_size)
        self.layer_steps, self.full_steps, self.batch_size = layer_steps, full_steps, batch_size
        self.layer_lr, self.lr, self.bn_weight, self.layer_bn_factor = layer_lr, lr, bn_weight, layer_bn_factor
        self.warmup, self.milestones, self.lr_decay = warmup, list(milestones), lr_decay
        self.boost, self.keep_best, self.search = boost, keep_best, search
        self.block_mse, self.ce_weight, self.tv_weight = block_mse, ce_weight, tv_weight
        self.feature_targets, self.observe_augmented = feature_targets, observe_augmented
        self.precision, self.nan_retries = str(precision), nan_retries
        self.progress, self.log_every = progress, log_every
        self.features = FeatureModel(blocks=contrastive_blocks, lr=contrastive_lr, epochs=contrastive_epochs,
                                     tau=contrastive_tau, select_step=select_step, keep_rate=keep_rate,
                                     selection=selection, rescale=rescale)
        self.laplace_weight, self.laplace_fit_epochs = laplace_weight, laplace_fit_epochs
        self.laplace_fit_lr = laplace_fit_lr
        self.laplace: list[LaplaceCovariance] = []  # REMIX: one per backbone BatchNorm layer, in module order
        self.observed: tuple[Tensor, Tensor] | None = None
        self.searched: list[tuple[float, float]] | None = None  # per block: (lr, weight) the search chose
        self.last_targets: Tensor | None = None  # the last synthesis's feature targets and labels
        self.last_labels: Tensor | None = None
        self.block_losses: list[tuple[float, float]] = []  # per block: (first, best) reconstruction MSE

    # --- the feature model ---------------------------------------------------------------------------
    def observe(self, teacher: nn.Module, real_batches, replay_images: Tensor | None,
                replay_labels: Tensor | None) -> None:
        """The boundary's feature model (`ClassWiseContrastiveBuffer.update_buffer`): Gaussians and contrastive
        encoders of the new classes from their real training features, of the old classes from the previous
        synthetic pool's features, both through the new teacher; with `laplace_weight`, REMIX's covariances."""
        if self.statistics == "data":
            self._observe_tokens(teacher, real_batches)
        if self.open_set is not None:
            self.open_set.observe(teacher.backbone.pretrained_copy(), real_batches, next(teacher.parameters()).device)
        if not self.refit_old:
            replay_images = None
        streams, handles = self._observe_covariance(teacher) if self.laplace_weight > 0 else ([], [])
        try:
            features, labels = extract_features(teacher, real_batches)
        finally:
            for handle in handles:
                handle.remove()
        n_new = len(labels.unique())
        if replay_images is not None:
            old = [(replay_images[i : i + 100], replay_labels[i : i + 100]) for i in range(0, len(replay_labels), 100)]
            old_features, old_labels = extract_features(teacher, old)
            keep = ~torch.isin(old_labels, labels.unique())
            features, labels = torch.cat([old_features[keep], features]), torch.cat([old_labels[keep], labels])
        self.features.fit(features, labels)
        self.observed = (features, labels) if self.feature_targets == "observed" else None
        if streams:
            self._fit_laplace(streams, len(labels.unique()) - n_new, n_new)

    def _observe_tokens(self, teacher: nn.Module, real_batches) -> None:
        """The data statistics of the block inputs (`update_input_stat`), through the model of the boundary
        before — at the first boundary the model before any training (`pretrained_copy`) — or the teacher."""
        source = teacher.backbone
        if self.stats_source == "previous":
            initial = getattr(teacher.backbone, "pretrained_copy", None)
            if self.stats_backbone is None and self._stats_experts is not None:  # resumed: rebuild it
                self.stats_backbone = initial().eval().requires_grad_(False)
                self.stats_backbone.load_state_dict(self._stats_experts, strict=False)
            source = self.stats_backbone or (initial() if initial else teacher.backbone)
        device = next(teacher.parameters()).device
        with frozen_eval(source):
            self.token_stats.update(collect(source.blocks(), real_batches, device))
        if self.stats_source == "previous":
            import copy

            self.stats_backbone = copy.deepcopy(teacher.backbone).eval().requires_grad_(False)

    def _observe_covariance(self, teacher: nn.Module) -> tuple[list[StreamingCovariance], list]:
        """Streaming covariance of every backbone BatchNorm input over the real images (REMIX's runner hook)."""
        layers = batchnorm_layers(teacher.backbone)
        streams = [StreamingCovariance() for _ in layers]
        handles = [layer.register_forward_hook(lambda m, i, o, s=stream: s.update(i[0]))
                   for layer, stream in zip(layers, streams)]
        return streams, handles

    def _fit_laplace(self, streams: list[StreamingCovariance], n_old: int, n_new: int) -> None:
        """Fit each layer's Laplace covariance to its observed correlation, blended with the previous fit."""
        if not self.laplace:
            self.laplace = [LaplaceCovariance(len(stream.mean)) for stream in streams]
        for model, stream in zip(self.laplace, streams):
            model.to(stream.mean.device).requires_grad_(True)
            model.fit(blended_correlation(model, stream.correlation(), n_old, n_new), self.laplace_fit_epochs,
                      self.laplace_fit_lr)
            model.eval().requires_grad_(False)

    def laplace_hooks(self, teacher: nn.Module, scope: nn.Module) -> list[LaplaceNLL]:
        """NLL hooks on the BatchNorm layers of `scope` (a block, or the whole teacher) that have a fitted model."""
        if not (self.laplace_weight > 0 and self.laplace):
            return []
        fitted = dict(zip(map(id, batchnorm_layers(teacher.backbone)), self.laplace))
        return [LaplaceNLL(layer, fitted[id(layer)].to(layer.running_mean.device)) for layer in batchnorm_layers(scope)
                if id(layer) in fitted]

    # --- synthesis -----------------------------------------------------------------------------------
    def synthesize(self, teacher: nn.Module, classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        missing = [c for c in classes if c not in self.features.gaussians.mean]
        if missing:
            raise RuntimeError(f"per_layer synthesis: no feature model for classes {missing} (call observe first)")
        self.stats = SynthesisStats()
        self.block_losses, self.searched = [], None
        if self.per_class:
            targets, labels = self.features.sample_per_class(self.per_class, classes, self.boost_rate)
        else:
            targets, labels = self.features.sample(n, classes)
        if self.observed is not None:
            targets = observed_targets(*self.observed, labels)
        self.last_targets, self.last_labels = targets, labels
        device = next(teacher.parameters()).device
        chunks = []
        with frozen_eval(teacher):
            if not batchnorm_layers(teacher) and self.statistics == "batchnorm":
                self.stats.notes.append("teacher has no BatchNorm layer: BN-statistics and BN-prior terms disabled; "
                                        "the feature targets carry the alignment")
            step = self.layer_batch if self.statistics == "data" else self.batch_size
            self.compile_now = self.statistics == "batchnorm" and self.compiles(teacher, len(labels))
            self.graphs_now = self.graphs(teacher)
            for start in range(0, len(labels), step):
                f = targets[start : start + step].to(device)
                y = labels[start : start + step].to(device)
                chunks.append(retry_on_nan(lambda lr, _, f=f, y=y: self.invert_batch(teacher, f, y, lr / self.lr),
                                           self.lr, self.nan_retries, self.stats, f"batch {start // step}"))
        return torch.cat(chunks).cpu(), labels

    def synthesize_open_set(self, teacher: nn.Module, n_old: int, n_seen: int) -> tuple[Tensor, Tensor]:
        """Block inputs of classes n_old..n_seen, which have no data: `open_set.per_class` projected targets each,
        inverted through pre-trained CLIP (output normalised) with its own block statistics, `bn_weight` and
        `input_tv_weight` (`build_outset_inv_data` with `openset_inversion_runner`)."""
        targets, labels = self.open_set.targets(teacher.head, n_old, n_seen)
        raw = nn.Module()
        raw.backbone = teacher.backbone.pretrained_copy()
        raw.backbone.normalize_output = True
        device = next(teacher.parameters()).device
        raw.to(device)
        self.stats = SynthesisStats()
        self.graphs_now = self.graphs(raw)
        self.block_losses, kept = [], (self.token_stats, self.bn_weight, self.input_tv_weight)
        self.token_stats, self.bn_weight = self.open_set.tokens, self.open_set.bn_weight
        self.input_tv_weight = self.open_set.input_tv_weight
        try:
            with frozen_eval(raw):
                chunks = [self.invert_batch(raw, targets[i : i + self.layer_batch].to(device), None)
                          for i in range(0, len(labels), self.layer_batch)]
        finally:
            self.token_stats, self.bn_weight, self.input_tv_weight = kept
        return torch.cat(chunks).cpu(), labels

    def graphs(self, teacher: nn.Module) -> bool:
        """Whether this boundary's phases run captured (`cuda_graph`; the phases' shortest steps decide `auto`).
        A vision transformer's phases (`statistics: data`) stay eager: their replay is not tested yet."""
        if self.statistics != "batchnorm":
            return False
        steps = min(self.layer_steps or self.full_steps, self.full_steps)
        return use_graphs(self.cuda_graph, steps, next(teacher.parameters()).device, self.compile_mode,
                          self.stats.notes, self.name)

    def invert_batch(self, teacher: nn.Module, target_features: Tensor, labels: Tensor,
                     lr_scale: float = 1.0) -> Tensor:
        """Per-block phase, then the full-model phase, both learning rates scaled by `lr_scale` (NaN retries)."""
        if self.statistics == "data":
            u = self.invert_token_blocks(teacher, target_features, lr_scale)
            return torch.cat([self.invert_token_full(teacher, u[i : i + self.batch_size],
                                                     target_features[i : i + self.batch_size], self.lr * lr_scale)
                              for i in range(0, len(u), self.batch_size)])
        image = self.invert_layers(teacher, target_features, self.layer_lr * lr_scale)
        return self.invert_full(teacher, image, target_features, labels, self.lr * lr_scale)

    def invert_layers(self, teacher: nn.Module, target_features: Tensor, layer_lr: float | None = None) -> Tensor:
        """The per-block phase, last block first; returns the image it ends with (`layer_steps=0`: N(0, 1))."""
        device, n = target_features.device, len(target_features)
        if self.layer_steps == 0:
            return torch.randn(n, *self.image_shape).to(device)
        layer_lr = self.layer_lr if layer_lr is None else layer_lr
        blocks = list(teacher.backbone.blocks())
        shares, shapes = self._block_costs_of(teacher, blocks, device)
        weight = self.bn_weight * len(blocks) * self.layer_bn_factor
        progress = SynthesisProgress(self.layer_steps * len(blocks), "PMI per-layer", self.stats, self.log_every,
                                     self.progress, engine=self.name, hint=HINT)
        if self.searched is None:
            self.searched = [None] * len(blocks)
        target = target_features
        try:
            for k in reversed(range(len(blocks))):
                last = k == len(blocks) - 1
                prior = last_batchnorm(blocks[k - 1]) if k > 0 else None
                forward = (lambda u, b=blocks[k]: pooled(b(u))) if last else blocks[k]
                candidates = ([(lr, w) for lr in (2 * layer_lr, layer_lr, layer_lr / 2, layer_lr / 4, layer_lr / 8)
                               for w in (weight, weight / 2, weight / 4, weight / 8)]
                              if self.search and self.searched[k] is None else [self.searched[k] or (layer_lr, weight)])
                best = None
                for lr, w in candidates:
                    start, prior_loss = block_start(prior, n, shapes[k], device)
                    laplace = self.laplace_hooks(teacher, blocks[k])
                    try:
                        with BatchNormInputs(blocks[k]) as bn:
                            u, loss, first = self.optimise(start, target, forward, bn, prior_loss, self.layer_steps,
                                                           lambda _, lr=lr: lr, w, weight, shares[k], progress,
                                                           {"block": k}, mse=self.block_mse, laplace=laplace)
                    finally:
                        for hook in laplace:
                            hook.remove()
                    if best is None or float(loss) < best[1]:
                        best = (u, float(loss), float(first), (lr, w))
                u, _, first, self.searched[k] = best
                with torch.no_grad():
                    self.block_losses.insert(0, (first, float(F.mse_loss(forward(u), target))))
                target = u
        finally:
            progress.close()
        return target

    def invert_token_blocks(self, teacher: nn.Module, targets: Tensor, lr_scale: float = 1.0) -> Tensor:
        """The per-block phase on a vision transformer, last block down to `start_block`; returns the start
        block's input (`layer_wise_inversion_for_cl`, first half, `search_param` off)."""
        device, n = targets.device, len(targets)
        blocks = list(teacher.backbone.blocks())
        shares, shapes = self._block_costs_of(teacher, blocks, device)
        weight = self.bn_weight * len(blocks) * self.layer_bn_factor
        total = self.layer_steps * (len(blocks) - 1 - self.start_block) + self.start_steps
        progress = SynthesisProgress(total, "PMI per-block (ViT)", self.stats, self.log_every, self.progress,
                                     engine=self.name, hint=HINT)
        target = targets
        try:
            for k in reversed(range(self.start_block, len(blocks))):
                first = k == self.start_block
                shape, grid = shapes[k], shapes[k][-1]
                if first and len(shape) == 3 and self.start_image_size:
                    size = grid * self.start_image_size // teacher.backbone.image_size[0]
                    shape = torch.Size([shape[0], size, size])
                start, prior = self.token_block_start(k, n, shape, device)
                modules = attention_and_mlp(blocks[k])
                stats = [self.token_stats.blocks[(name, k)].stats() for name in modules]
                forward = ((lambda u, b=blocks[k], g=grid: b(upsample(u, g))) if first and len(shape) == 3
                           else blocks[k])
                with StatisticHooks(list(modules.values()), stats) as hooks:
                    u, _, first_mse = self.optimise(
                        start, target, forward, hooks, prior, self.start_steps if first else self.layer_steps,
                        lambda _, lr=(self.start_lr if first else self.layer_lr) * lr_scale: lr, weight, weight,
                        shares[k], progress, {"block": k}, keep_best=self.keep_best if first else True,
                        upsample_at=self.start_upsample if first and len(shape) == 3 else (), upsample_cap=grid)
                with torch.no_grad():
                    self.block_losses.insert(0, (float(first_mse), float(F.mse_loss(forward(u), target))))
                target = u
        finally:
            progress.close()
        return target

    def token_block_start(self, k: int, n: int, shape: torch.Size,
                          device: torch.device) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Block k's starting input N(mean, var) of its real inputs' statistics per index of dim 1, and the prior
        KL(u ‖ that Gaussian) (`init_layer_input`, `KLDivergence`)."""
        mean, var = (t.to(device) for t in self.token_stats.blocks[("input", k)].stats())
        view = (1, -1, *[1] * (len(shape) - 1))
        start = torch.randn(n, *shape).to(device) * var.clamp(min=0).sqrt().view(view) + mean.view(view)
        return start, lambda u: position_kl(u, mean, var, 1e-8)

    def invert_token_full(self, teacher: nn.Module, u: Tensor, targets: Tensor, lr: float) -> Tensor:
        """The full-model phase from the start block's input (`layer_wise_inversion_for_cl`, second half): MSE
        + `bn_weight`·Σ KL(residual-block inputs ‖ data) + `input_tv_weight`·TV(u), cosine lr."""
        blocks = list(teacher.backbone.blocks())
        tail, grid = blocks[self.start_block :], u.shape[-1]
        # the residual blocks the tail runs (all of them from the reference's start blocks, which precede them)
        residual = [(k, b) for k, b in enumerate(blocks) if k >= self.start_block and attention_and_mlp(b)]
        stats = [self.token_stats.model[("input", k)].stats() for k, _ in residual]
        progress = SynthesisProgress(self.full_steps, "PMI full-model (ViT)", self.stats, self.log_every,
                                     self.progress, engine=self.name, hint=HINT)

        def forward(x: Tensor) -> Tensor:
            x = upsample(x, grid) if x.dim() == 4 else x
            for block in tail:
                x = block(x)
            return x.float()

        def lr_at(step: int) -> float:
            if self.full_schedule == "cosine":
                return lr * (1 + math.cos(math.pi * step / self.cosine_period)) / 2
            return full_phase_lr(step, lr, self.warmup, self.milestones, self.lr_decay)

        tv_weight = self.input_tv_weight if u.dim() == 4 else 0.0  # TV of a patch grid; tokens have none
        try:
            with StatisticHooks([b for _, b in residual], stats) as hooks:
                x, _, _ = self.optimise(u, targets, forward, hooks, None, self.full_steps, lr_at, self.bn_weight,
                                        self.bn_weight, 1.0, progress, {}, tv_weight=tv_weight,
                                        keep_best=self.keep_best)
        finally:
            progress.close()
        return x

    @property
    def pool_is_pixels(self) -> bool:
        """Whether the pool holds images (false: inputs of block `start_block` of a vision transformer)."""
        return self.statistics != "data"

    def pool_features(self, teacher: nn.Module, x: Tensor) -> Tensor:
        """The teacher's features of pool entries."""
        if self.pool_is_pixels:
            return teacher.features(x)
        return teacher.backbone.forward_from(self.start_block, x)

    def invert_full(self, teacher: nn.Module, image: Tensor, target_features: Tensor, labels: Tensor,
                    lr: float | None = None) -> Tensor:
        """The full-model phase from the per-block image: MSE of the pooled feature + Σ BN KL."""
        lr = self.lr if lr is None else lr
        progress = SynthesisProgress(self.full_steps, "PMI full-model", self.stats, self.log_every, self.progress,
                                     engine=self.name, hint=HINT)
        if self.step_hook is not None:
            self.step_hook(image.detach(), -1)

        net = compiled_teacher(teacher, self.compile_now, self.compile_mode)

        def forward(x: Tensor) -> Tensor:
            with autocast(self.precision, x.device):
                features = net.features(x)
            return features.float()

        extra = None
        if self.ce_weight or self.tv_weight:
            def extra(x: Tensor, features: Tensor) -> Tensor:
                ce = F.cross_entropy(teacher.head(features), labels) if self.ce_weight else 0.0
                tv = total_variation_l2(x) if self.tv_weight else 0.0
                return self.ce_weight * ce + self.tv_weight * tv
        laplace = self.laplace_hooks(teacher, teacher)
        try:
            with BatchNormInputs(teacher, compiled=self.compile_now) as bn:
                x, _, _ = self.optimise(image, target_features, forward, bn, None, self.full_steps,
                                        lambda k: full_phase_lr(k, lr, self.warmup, self.milestones, self.lr_decay),
                                        self.bn_weight, self.bn_weight, 1.0, progress, {}, extra=extra,
                                        step_hook=self.step_hook, laplace=laplace)
        finally:
            progress.close()
            for hook in laplace:
                hook.remove()
        return x

    def planned_steps(self, n: int) -> tuple[int, int]:
        """The full-model phase's steps (the one compiled) over the boundary's batches."""
        return self.full_steps * math.ceil(n / self.batch_size), min(self.batch_size, n)

    def optimise(self, start: Tensor, target: Tensor, forward: Callable[[Tensor], Tensor], bn: BatchNormInputs,
                 prior: Callable[[Tensor], Tensor] | None, steps: int, lr_at: Callable[[int], float], weight: float,
                 base: float, share: float, progress: SynthesisProgress, tags: dict, mse: str = "plain",
                 extra: Callable | None = None, step_hook: Callable | None = None,
                 laplace: Sequence[LaplaceNLL] = (), keep_best: bool | None = None, upsample_at: Sequence[int] = (),
                 upsample_cap: int = 0, tv_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """PMI's `inversion` loop on one input tensor. Returns the kept input (the iterate after the step with
        the lowest `MSE + base·(BN + prior)`, or the last with `keep_best=false`), that lowest value and the
        first MSE. Weights: α_mse from 1, α_bn = α_in = `weight`; with `boost`, at a step whose term exceeds its
        first value, α_mse doubles up to 10, α_bn up to 10·base, α_in up to 5·base. Everything stays on the
        device. CLIP's loop adds: at `upsample_at` steps the input doubles (bicubic, ≤ `upsample_cap`), Adam
        restarts; `tv_weight`·`total_variation_4(x)` joins both losses; `keep_best` overrides the engine's."""
        keep_best = self.keep_best if keep_best is None else keep_best
        # captured when a replay follows the warm-up, and not where the input grows (its shapes change)
        capture = self.graphs_now and not upsample_at and steps > GRAPH_WARMUP_STEPS
        x = start.detach().clone().requires_grad_(True)
        lr = torch.full((), lr_at(0), device=x.device) if capture else lr_at(0)
        optimizer = torch.optim.Adam([x], lr=lr)
        state, zero = LoopState(x, weight), torch.zeros((), device=x.device)

        def step() -> tuple[Tensor, Tensor, Tensor]:
            out = forward(x)
            terms = {"mse": relative_mse(out, target) if mse == "relative" else F.mse_loss(out, target),
                     "bn": bn.kl() if len(bn) else zero, "in": prior(x) if prior is not None else zero}
            state.weigh(terms, self.boost, base)
            alpha = state.alpha
            l_lap = torch.stack([hook.nll() for hook in laplace]).mean() if laplace else zero
            loss = (alpha["mse"] * terms["mse"] + alpha["bn"] * terms["bn"] + self.laplace_weight * l_lap
                    + alpha["in"] * terms["in"])
            l_tv = total_variation_4(x) if tv_weight else zero
            loss = loss + tv_weight * l_tv if tv_weight else loss
            if extra is not None:
                loss = loss + extra(x, out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            held = {k: t.detach().double() for k, t in terms.items()}
            state.keep(held["mse"] + base * held["bn"] + self.laplace_weight * l_lap.detach().double()
                       + base * held["in"] + tv_weight * l_tv.detach().double(), x.detach())
            return loss, terms["mse"], terms["bn"]

        run_step = StepGraph(step, capture, self.name)
        with adam_update(optimizer, capturable=capture):
            for i in range(steps):
                if i in upsample_at:
                    x = upsample(x.detach(), min(2 * x.shape[-1], upsample_cap)).requires_grad_(True)
                    optimizer = torch.optim.Adam([x], lr=lr_at(i))
                set_lr(optimizer, lr_at(i))
                loss, l_mse, l_bn = run_step()
                self.stats.full_model_passes += share
                progress.update({**tags, "mse": l_mse, "bn": l_bn}, loss)
                if step_hook is not None:
                    step_hook(x.detach(), i)
        kept = state.best_x if keep_best else x.detach()
        return kept, state.best_loss, state.first.get("mse", torch.full((), float("nan")))

    def _block_costs_of(self, teacher: nn.Module, blocks: list[nn.Module], device: torch.device):
        """One FLOP probe per teacher, not per batch (a new teacher drops the old entry)."""
        costs = getattr(self, "_block_costs", {})
        if id(teacher) not in costs:
            probe = torch.zeros(2, *self.image_shape, device=device)
            costs = {id(teacher): block_costs(blocks, probe)}
            self._block_costs = costs
        return costs[id(teacher)]

    def replay(self, teacher: nn.Module, images: Tensor, labels: Tensor) -> BufferReplay:
        """The pool, sampled without replacement per batch (`ClassWiseContrastiveBuffer.get_data`)."""
        return BufferReplay(images, labels, replacement=self.replay_replacement)

    def state_dict(self) -> dict:
        """Feature model, covariances, block statistics, the open-set model, and the statistics model's experts
        (its only weights that differ from the teacher's architecture as built; rebuilt on first use)."""
        stats_model = self.stats_backbone
        experts = ({k: v.clone() for k, v in stats_model.state_dict().items() if is_expert_parameter(k)}
                   if stats_model is not None else self._stats_experts)
        return {"features": self.features.state_dict(), "laplace": [m.state_dict() for m in self.laplace],
                "tokens": self.token_stats.state_dict(), "stats_experts": experts,
                "open_set": self.open_set.state_dict() if self.open_set is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.features.load_state_dict(state["features"])
            self.token_stats.load_state_dict(state.get("tokens", {}))
            self.stats_backbone, self._stats_experts = None, state.get("stats_experts")
            if self.open_set is not None and state.get("open_set"):
                self.open_set.load_state_dict(state["open_set"])
            self.laplace = []
            for saved in state.get("laplace", []):
                model = LaplaceCovariance(len(saved["a"]))
                model.load_state_dict(saved)
                self.laplace.append(model.eval().requires_grad_(False))
