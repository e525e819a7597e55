"""open_clip image towers as backbones, with the text tower kept for text-initialised heads and zero-shot.

`ClipBackbone(x)` takes images as our datasets give them — normalised with the *dataset's* mean/std, at
the dataset's size and channel count — and, inside `forward`, undoes that normalisation, resizes to the
model's image size (open_clip's preprocess interpolation, antialiased), repeats a grey channel to RGB and
re-normalises with CLIP's mean/std from open_clip's preprocess config. Every step is a differentiable
tensor op, so inversion engines can optimise dataset-space pixels through it.

Only the image tower (`visual`) is part of the module tree (trained, checkpointed, copied for teachers).
The text tower is frozen, never trained and shared, not copied, by `copy.deepcopy` (a teacher snapshot
of a ViT-B/32 stays one image tower); it is rebuilt from `pretrained` on resume.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.models.backbones import Backbone
from cl_inversion.utils.errors import ConfigError

log = logging.getLogger("cl_inversion")
CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
TEMPLATES = ("a photo of a {name}.", "a blurry photo of a {name}.", "a photo of the small {name}.",
             "a photo of the large {name}.", "itap of a {name}.")
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")
_registered = False


def register_clip_configs() -> None:
    """Add the project's model configs (`clip_tiny`, ...) to open_clip's registry (once)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


class _Shared:
    """Holds objects outside the module tree: not in `parameters()`/`state_dict()`, and `deepcopy`
    returns the same holder, so teacher snapshots share the frozen text tower instead of copying it."""

    def __init__(self, **items: Any) -> None:
        self.__dict__.update(items)

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class _Stem(nn.Module):
    """Input handling + patch embedding, class token, positional embedding and ln_pre: images → tokens."""

    def __init__(self, backbone: ClipBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.visual._embeds(self.backbone.preprocess(x))


class _Pool(nn.Module):
    """ln_post + class-token (or mean) pooling + projection: tokens → image embedding."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: Tensor) -> Tensor:
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled.float()


def _check_model_name(model_name: str) -> None:
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")) or model_name in open_clip.list_models():
        return
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"backbone.model_name={model_name!r} is not an open_clip model; {hint}e.g. clip_tiny, ViT-B-32, "
                      "ViT-B-16, ViT-L-14 (all: python -c 'import open_clip; print(open_clip.list_models())')")


def _check_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """A known open_clip tag (downloaded on first use) or an existing local weights file; else ConfigError."""
    import open_clip

    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return None
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    known = f"its tags: {', '.join(tags[:6])}{', ...' if len(tags) > 6 else ''}" if tags else "it has no tags"
    raise ConfigError(f"backbone.pretrained={pretrained!r} is neither an existing weights file nor a pretrained "
                      f"tag of {model_name} ({known}); use null for random init")


class ClipInputs:
    """Dataset-normalised images in, CLIP's inputs out: for a backbone with buffers `input_mean`/`input_std`
    (the dataset's), `clip_mean`/`clip_std`, an `image_size`, an `interpolation` and an open_clip `visual`."""

    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The dataset's per-channel mean/std, undone in `preprocess` (called when a task starts)."""
        self.input_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_std.copy_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def preprocess(self, x: Tensor) -> Tensor:
        """Dataset-normalised images (any size, 1 or 3 channels) → CLIP-normalised RGB at the model's size."""
        x = x.float() * self.input_std + self.input_mean
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode=self.interpolation, align_corners=False,
                              antialias=self.interpolation in ("bilinear", "bicubic"))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.clip_mean) / self.clip_std
        return x.to(self.visual.conv1.weight.dtype)


class ClipBackbone(ClipInputs, Backbone):
    """An open_clip model's image tower as a backbone; `forward(x)` returns the (unnormalised) image embedding.

    `blocks()` = [stem (input handling + patch embedding), residual block 1..L, pool (ln_post + projection)],
    so a per-layer inversion engine walks ViT blocks; ViTs have no BatchNorm (`has_batchnorm` is False).
    `trainable`: "frozen", "all", or k = the last k residual blocks + ln_post + projection (open_clip's
    `lock(unlocked_groups=k + 1)`). `precision` is open_clip's (weights cast; inputs follow, outputs are
    fp32); for mixed-precision training of an unfrozen tower use `trainer.precision=bf16-mixed` instead.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        trainable: str | int = "frozen",
        precision: str = "fp32",
        in_channels: int = 3,
        logit_scale: float | None = None,
        templates: Sequence[str] = TEMPLATES,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        register_clip_configs()
        _check_model_name(model_name)
        weights = _check_pretrained(model_name, pretrained)
        if precision not in PRECISIONS:
            raise ConfigError(f"backbone.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
        try:
            model = open_clip.create_model(model_name, pretrained=weights, precision=precision, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"backbone.model_name={model_name!r} backbone.pretrained={pretrained!r}: could not "
                              f"build the model: {first[:300]} (offline? pass a local weights file)") from None
        visual = model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise ConfigError(f"backbone.model_name={model_name!r} has a {type(visual).__name__} image tower; only "
                              "open_clip ViT towers are supported (blocks() walks transformer blocks)")
        if not getattr(visual.transformer, "batch_first", True):
            raise ConfigError(f"backbone.model_name={model_name!r}: sequence-first transformers are not supported")
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.visual = visual
        model.visual = nn.Identity()  # what stays in the shared holder is the text side only
        model.requires_grad_(False).eval()
        self._text = _Shared(model=model, tokenizer=open_clip.get_tokenizer(model_name),
                             templates=[t.replace("{}", "{name}") for t in templates])
        self._set_trainable(trainable)

        self.model_name = model_name
        self.image_size = tuple(visual.image_size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.feature_dim = int(visual.output_dim)
        scale = float(model.logit_scale.exp().clamp(max=100).item()) if logit_scale is None else float(logit_scale)
        self.head_logit_scale = scale  # read by IncrementalClassifier: cosine head at CLIP's temperature
        self.register_buffer("clip_mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1))
        # dataset normalisation; identity (inputs are raw [0,1] pixels) until set_input_normalization
        self.register_buffer("input_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("input_std", torch.ones(1, in_channels, 1, 1))

    def _set_trainable(self, trainable: str | int) -> None:
        layers = len(self.visual.transformer.resblocks)
        if trainable == "all":
            return
        if trainable == "frozen":
            self.visual.lock(unlocked_groups=0)
        elif isinstance(trainable, int) and not isinstance(trainable, bool) and 0 <= trainable <= layers:
            self.visual.lock(unlocked_groups=trainable + 1)
        else:
            raise ConfigError(f"backbone.trainable={trainable!r} must be frozen, all, or the number of last "
                              f"visual blocks to train (0..{layers}; ln_post and the projection train too)")


    # --- backbone interface ------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return [_Stem(self), *self.visual.transformer.resblocks, _Pool(self.visual)]

    def forward(self, x: Tensor) -> Tensor:
        return self.visual(self.preprocess(x)).float()

    # --- text side ---------------------------------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """[len(class_names), feature_dim]: each name through every prompt template and the text tower,
        averaged and L2-normalised (open_clip's `build_zero_shot_classifier`)."""
        import open_clip

        device = self.clip_mean.device
        model = self._text.model.to(device)
        templates = [lambda c, t=t: t.format(c, name=c) for t in self._text.templates]
        weights = open_clip.build_zero_shot_classifier(model, self._text.tokenizer, list(class_names), templates,
                                                       num_classes_per_batch=10, device=device)
        return weights.T.float()

    @torch.no_grad()
    def zero_shot_logits(self, x: Tensor, text_embeddings: Tensor) -> Tensor:
        """Cosine similarity of image and text embeddings × the head's logit scale (CLIP's zero-shot rule)."""
        return self.head_logit_scale * F.normalize(self(x), dim=-1) @ text_embeddings.t()
