"""A frozen open_clip model with mixture-of-experts adapters in every residual block of both towers
(MoE-Adapters4CL, Yu et al., CVPR 2024), as PMI's CLIP learner builds it.

Reference: pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at d1f7f86, `CLIP/clip_backbones/moe_clip.py`
(`Adapter`, `SparseDispatcher`, `ResidualAttentionBlock.noisy_top_k_gating` and `forward`, `CLIP.encode_text`),
and `CLIP/inversion/utils.py` `split_clip_blocks` with `CLIP/inversion/building_blocks.py` (`PreTransformBlock`,
`PostTransformBlock`) for the blocks the per-block inversion walks.

Per block: x ← x + attn(ln_1(x)); gates = top-k softmax of x[:, 0] · W_gate (+ N(0, 1) · (softplus(x[:, 0] · W_noise)
+ 0.01) while training); x ← x + mlp(ln_2(x)) + Σ_e gate_e · adapter_e(x), with adapter_e = 0.1 · up(dropout(relu(
down(x)))) (64 hidden units, dropout 0.1, `down` Kaiming-uniform, `up` and biases zero: the model starts as CLIP).
Two experts, top-2, routers and noise weights zero-initialised. Only the adapters, routers and noise weights train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.models.backbones import Backbone
from cl_inversion.models.clip import (
    ClipInputs,
    _check_model_name,
    _check_pretrained,
    _Shared,
    register_clip_configs,
)
from cl_inversion.utils.errors import ConfigError


class Adapter(nn.Module):
    """`Adapter` (adapter_layernorm_option 'none', init 'lora', adapter_scalar 0.1), without the residual:
    scale · up(dropout(relu(down(x))))."""

    def __init__(self, width: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1) -> None:
        super().__init__()
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        self.dropout, self.scale = dropout, scale
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        down = F.dropout(F.relu(self.down_proj(x)), p=self.dropout, training=self.training)
        return self.up_proj(down) * self.scale


def top_k_gates(logits: Tensor, k: int) -> Tensor:
    """Softmax over each row's k largest logits, zero elsewhere (`noisy_top_k_gating`'s `gates`)."""
    top, index = logits.topk(min(k, logits.shape[1]), dim=1)
    return torch.zeros_like(logits).scatter(1, index, torch.softmax(top, dim=1))


@torch.no_grad()
def without_experts(model: nn.Module) -> nn.Module:
    """`model` with every expert's `up_proj` zeroed in place: the experts add nothing (pre-trained CLIP)."""
    for module in model.modules():
        if isinstance(module, Adapter):
            module.up_proj.weight.zero_()
            module.up_proj.bias.zero_()
    return model


class MoEBlock(nn.Module):
    """An open_clip `ResidualAttentionBlock` (batch-first) with the reference's experts added beside its MLP.

    The router sees the first token after attention; noise is added while the block is in training mode
    (the reference's `is_train`, which its learner sets for the student during training only; `noisy=False`
    turns it off, e.g. to compare training loops term by term). The experts run
    densely and are weighted by the gates: the reference's `SparseDispatcher` gives each expert the rows whose
    gate is non-zero, the same sum.
    """

    def __init__(self, block: nn.Module, experts: int = 2, top_k: int = 2, bottleneck: int = 64,
                 dropout: float = 0.1, scale: float = 0.1, noise_epsilon: float = 1e-2, noisy: bool = True) -> None:
        super().__init__()
        self.block = block
        width = block.ln_1.normalized_shape[0]
        self.adapters = nn.ModuleList(Adapter(width, bottleneck, dropout, scale) for _ in range(experts))
        self.router = nn.Parameter(torch.zeros(width, experts))
        self.noise = nn.Parameter(torch.zeros(width, experts))
        self.top_k, self.noise_epsilon, self.noisy = top_k, noise_epsilon, noisy

    def get_weight_dtype(self) -> torch.dtype:
        return self.block.get_weight_dtype()

    def gates(self, first_token: Tensor) -> Tensor:
        logits = first_token @ self.router.to(first_token)
        if self.training and self.noisy:
            std = F.softplus(first_token @ self.noise.to(first_token)) + self.noise_epsilon
            logits = logits + torch.randn_like(logits) * std
        return top_k_gates(logits, self.top_k)

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        b = self.block
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        gates = self.gates(x[:, 0])
        experts = sum(g.view(-1, 1, 1) * adapter(x) for g, adapter in zip(gates.T, self.adapters))
        return x + b.ls_2(b.mlp(b.ln_2(x))) + experts.to(x.dtype)


def add_experts(transformer: nn.Module, **kwargs) -> None:
    """Wrap every residual block of an open_clip `Transformer` in a `MoEBlock`."""
    transformer.resblocks = nn.ModuleList(MoEBlock(block, **kwargs) for block in transformer.resblocks)


def is_expert_parameter(name: str) -> bool:
    """The reference trains parameters named 'adaptmlp', 'router' or 'noise': here adapters, router, noise."""
    return any(part in name.split(".") for part in ("adapters", "router", "noise"))


class PatchEmbedding(nn.Module):
    """Input handling and the patch convolution: dataset images → [N, width, grid, grid] (the reference's
    block 0, `conv1`, with our `preprocess` before it)."""

    def __init__(self, backbone: MoEClipBackbone) -> None:
        super().__init__()
        self.backbone = _Shared(module=backbone)

    def forward(self, x: Tensor) -> Tensor:
        backbone = self.backbone.module
        return backbone.visual.conv1(backbone.preprocess(x))


class TokenEmbedding(nn.Module):
    """[N, width, h, w] → tokens: flatten, class token, positional embedding, ln_pre (`PreTransformBlock`)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = _Shared(module=visual)

    def forward(self, x: Tensor) -> Tensor:
        v = self.visual.module
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        return v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))


class ClassTokenPool(nn.Module):
    """tokens → ln_post(class token) · proj, L2-normalised (+1e-6) with `normalize` (`PostTransformBlock`)."""

    def __init__(self, visual: nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.visual, self.normalize = _Shared(module=visual), normalize

    def forward(self, x: Tensor) -> Tensor:
        v = self.visual.module
        out = (v.ln_post(x[:, 0]) @ v.proj).float()
        return out / (out.norm(dim=-1, keepdim=True) + 1e-6) if self.normalize else out


class MoEClipBackbone(ClipInputs, Backbone):
    """open_clip's image tower with experts in every block; `forward(x)` is the unnormalised image embedding.

    Inputs are dataset-normalised images, as for `ClipBackbone` (undone, resized, CLIP-normalised inside).
    The text tower (with its own experts) is handed to the head once (`text_tower`); the learner owns it.
    `blocks()` is the reference's split (`split_clip_blocks(split_cnn=True)`): patch convolution, token
    embedding, each residual block, the class-token projection.
    """

    has_batchnorm = False

    def __init__(self, model_name: str, pretrained: str | None = None, precision: str = "fp32",
                 in_channels: int = 3, experts: int = 2, top_k: int = 2, bottleneck: int = 64,
                 adapter_dropout: float = 0.1, adapter_scale: float = 0.1, router_noise: bool = True,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        import open_clip

        register_clip_configs()
        _check_model_name(model_name)
        weights = _check_pretrained(model_name, pretrained)
        try:
            model = open_clip.create_model(model_name, pretrained=weights, precision=precision, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError) as err:
            raise ConfigError(f"backbone.model_name={model_name!r} backbone.pretrained={pretrained!r}: could not "
                              f"build the model: {str(err).strip()[:300]} (offline? a local weights file)") from None
        if not hasattr(model, "transformer") or not hasattr(model.visual, "transformer"):
            raise ConfigError(f"backbone.model_name={model_name!r}: experts need open_clip's ViT image and "
                              "transformer text towers")
        model.requires_grad_(False)
        options = dict(experts=experts, top_k=top_k, bottleneck=bottleneck, dropout=adapter_dropout,
                       scale=adapter_scale, noisy=router_noise)
        add_experts(model.visual.transformer, **options)
        add_experts(model.transformer, **options)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.visual = model.visual
        model.visual = nn.Identity()
        self._text = _Shared(model=model, tokenizer=open_clip.get_tokenizer(model_name))
        self.model_name = model_name
        self.image_size = tuple(self.visual.image_size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.feature_dim = int(self.visual.output_dim)
        self.register_buffer("clip_mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("input_std", torch.ones(1, in_channels, 1, 1))

    def text_tower(self) -> tuple[nn.Module, object]:
        """The open_clip model without its image tower (text transformer with experts) and its tokenizer."""
        return self._text.model, self._text.tokenizer

    def pretrained_copy(self) -> MoEClipBackbone:
        """A copy whose experts add nothing (every `up_proj` zero): the model before any training."""
        import copy

        return without_experts(copy.deepcopy(self))

    #: the last block's output L2-normalised when `blocks()` is not told (an inversion runner's `normalize`)
    normalize_output: bool = False

    def blocks(self, normalize: bool | None = None) -> list[nn.Module]:
        normalize = self.normalize_output if normalize is None else normalize
        return [PatchEmbedding(self), TokenEmbedding(self.visual), *self.visual.transformer.resblocks,
                ClassTokenPool(self.visual, normalize)]

    def forward_from(self, start: int, x: Tensor, normalize: bool = False) -> Tensor:
        """The embedding of `x`, the input of block `start` (the reference's `Sequential(*blocks[start:])`)."""
        for block in self.blocks(normalize)[start:]:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.visual(self.preprocess(x)).float()


class PromptHead(nn.Module):
    """Classifier from the text tower: logit_scale · normalize(f) · normalize(text(prompt of each class))ᵀ.

    The prompts are `template` filled with each class name (the reference: one template, "a bad photo of a {}.");
    the text tower, with its experts, is part of the module (trained, copied into the teacher). The
    temperature is the model's exp(logit_scale), not trained (the reference's optimiser holds experts only).
    """

    def __init__(self, text_model: nn.Module, tokenizer: object, template: str = "a bad photo of a {}.") -> None:
        super().__init__()
        self.text = text_model
        self.tokenizer = _Shared(fn=tokenizer)
        self.template = template
        self.prompts: list[str] = []
        self.sizes: list[int] = []

    @property
    def logit_scale(self) -> Tensor:
        return self.text.logit_scale.exp()

    def grow(self, n_new: int, weight: Tensor | None = None) -> None:
        """Room for `n_new` classes; their prompts come from `name_classes` (the names are not known here)."""
        self.sizes.append(n_new)

    def name_classes(self, names: Sequence[str]) -> None:
        """The prompts of the newest classes, in label order."""
        if len(self.prompts) + len(names) != sum(self.sizes):
            raise ValueError(f"PromptHead: {len(names)} names for {sum(self.sizes) - len(self.prompts)} new classes")
        self.prompts += [self.template.format(name.replace("_", " ")) for name in names]

    def text_features(self, start: int = 0, end: int | None = None) -> Tensor:
        """Normalised text features of classes start..end (`CLIP.encode_text(normalize=True)`)."""
        device = self.text.logit_scale.device
        tokens = self.tokenizer.fn(self.prompts[start:end]).to(device)
        return F.normalize(self.text.encode_text(tokens).float(), dim=-1)

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """`logit_scale · normalize(image) · textᵀ` (text features already normalised)."""
        return self.logit_scale * F.normalize(image_features.float(), dim=-1) @ text_features.T

    def forward(self, features: Tensor) -> Tensor:
        return self.logits(features, self.text_features())

    @property
    def out_features(self) -> int:
        return sum(self.sizes)
