"""Statistics of a vision transformer's block inputs on real data, and the KL terms PMI's CLIP inversion builds
from them (a ViT has no BatchNorm running statistics to invert towards).

Reference: pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at d1f7f86, `CLIP/inversion/input_stats.py`
(`InputStatHook`, `get_data_transformer_block_stats`, `get_data_block_input_stats`, `merge_stats`),
`CLIP/inversion/functions.py` (`CustomBNInputHook`, `TotalVariation`) and
`CLIP/inversion/layer_wise_clip_inversion.py` (`KLDivergence`, `init_layer_input`, `update_input_stat`).

Statistics are per index of dimension 1 over every other dimension: per channel of the patch embeddings
[N, C, h, w], per token position of the token tensors [N, L, D] (the reference's sequence-first [L, N, D] with
`batch_dim=1`: the mean over batch and width). Kept per block input ("input", k), and per residual block the
inputs of its attention and MLP ("attn", k), ("mlp", k). Each boundary's statistics are pooled with the earlier
ones by image counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.inversion.common import InputHooks

Key = tuple[str, int]


def position_kl(x: Tensor, mean: Tensor, var: Tensor, var_eps: float) -> Tensor:
    """½·mean over indices of dim 1 of log var − log(v + 1e-8) − (1 − (v + (m − mean)²)/var), with m, v the
    mean and biased variance (+ `var_eps`) over the other dims. `var_eps` 1e-8: `KLDivergence` (the block-input
    prior); 0: `CustomBNInputHook` (the attention / MLP / block-input terms)."""
    values = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    m, v = values.mean(1), values.var(1, unbiased=False) + var_eps
    return 0.5 * (torch.log(var) - torch.log(v + 1e-8) - (1 - (v + (m - mean) ** 2) / var)).mean()


def total_variation_4(x: Tensor) -> Tensor:
    """`TotalVariation(p=2)`: per (image, channel) the L2 norm of the differences right, down and along both
    diagonals, each averaged over images and channels, summed."""
    diffs = (x[:, :, :, 1:] - x[:, :, :, :-1], x[:, :, 1:, :] - x[:, :, :-1, :],
             x[:, :, 1:, 1:] - x[:, :, :-1, :-1], x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
    return sum(torch.linalg.vector_norm(d, dim=(2, 3)).mean() for d in diffs)


def attention_and_mlp(block: nn.Module) -> dict[str, nn.Module]:
    """The attention and MLP modules of a residual block (an open_clip block, or one wrapped with experts)."""
    inner = getattr(block, "block", block)
    return {name: getattr(inner, name) for name in ("attn", "mlp") if hasattr(inner, name)}


class Moments:
    """Running per-index mean and mean square (`InputStatHook.update_stat`). Each batch's means are weighted by
    the reference's `inputs.shape[0]`: the images of a patch-embedding batch, but the sequence length of a
    sequence-first token batch (every token batch weighs the same). `count` (images) weighs boundaries when
    merging, as the reference's `total_cnt`."""

    def __init__(self) -> None:
        self.mean: Tensor | float = 0.0
        self.square: Tensor | float = 0.0
        self.weight = 0
        self.count = 0

    def update(self, x: Tensor) -> None:
        values = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1).cpu()
        w = x.shape[0] if x.dim() == 4 else x.shape[1]
        share = w / (self.weight + w)
        self.mean = (1 - share) * self.mean + share * values.mean(1)
        self.square = (1 - share) * self.square + share * (values**2).mean(1)
        self.weight += w
        self.count += x.shape[0]

    def merged(self, other: Moments) -> Moments:
        """Pooled by counts (`merge_stats`)."""
        out = Moments()
        total = self.count + other.count
        out.mean = self.count / total * self.mean + other.count / total * other.mean
        out.square = self.count / total * self.square + other.count / total * other.square
        out.count = total
        return out

    def stats(self) -> tuple[Tensor, Tensor]:
        """(mean, var = mean square − mean²), float32."""
        return torch.as_tensor(self.mean).float(), torch.as_tensor(self.square - self.mean**2).float()


@torch.no_grad()
def collect(blocks: Sequence[nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
            device: torch.device) -> dict[Key, Moments]:
    """Moments of every block input after the first and of each residual block's attention and MLP inputs,
    over `batches` run through `blocks` in order."""
    moments: dict[Key, Moments] = {}
    handles = []
    for k, block in enumerate(blocks):
        for name, module in attention_and_mlp(block).items():
            moments[(name, k)] = Moments()
            handles.append(module.register_forward_hook(
                lambda m, i, o, acc=moments[(name, k)]: acc.update(i[0])))
    try:
        for x, _ in batches:
            x = x.to(device)
            for k, block in enumerate(blocks):
                if k > 0:
                    moments.setdefault(("input", k), Moments()).update(x)
                x = block(x)
    finally:
        for handle in handles:
            handle.remove()
    return moments


class TokenStatistics:
    """The data statistics of one run, pooled over boundaries. `merge_limit`: keys of blocks with index ≥ it keep
    their first boundary's block statistics (the reference merges the files of blocks 0–13 only, so ViT-B/16's
    last block, 14, keeps the first task's); the residual-block inputs of the full-model phase merge always."""

    def __init__(self, merge_limit: int | None = 14) -> None:
        self.merge_limit = merge_limit
        self.blocks: dict[Key, Moments] = {}
        self.model: dict[Key, Moments] = {}

    def update(self, moments: dict[Key, Moments]) -> None:
        for key, new in moments.items():
            frozen = self.merge_limit is not None and key[1] >= self.merge_limit and key in self.blocks
            if not frozen:
                self.blocks[key] = self.blocks[key].merged(new) if key in self.blocks else new
            self.model[key] = self.model[key].merged(new) if key in self.model else new

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def state_dict(self) -> dict:
        pack = lambda d: {f"{n}.{k}": (m.mean, m.square, m.count) for (n, k), m in d.items()}  # noqa: E731
        return {"blocks": pack(self.blocks), "model": pack(self.model)}

    def load_state_dict(self, state: dict) -> None:
        def unpack(d: dict) -> dict[Key, Moments]:
            out = {}
            for key, (mean, square, count) in d.items():
                name, k = key.split(".")
                out[(name, int(k))] = m = Moments()
                m.mean, m.square, m.count = mean, square, count
            return out
        self.blocks, self.model = unpack(state.get("blocks", {})), unpack(state.get("model", {}))


class StatisticHooks(InputHooks):
    """The inputs of `modules`; `kl()` sums `position_kl(var_eps=0)` against each module's statistics
    (`CustomBNInputHook.stats_regularization`, summed as the reference's `l_stat`)."""

    def __init__(self, modules: Sequence[nn.Module], stats: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.stats = list(stats)
        super().__init__(modules)

    def kl(self) -> Tensor:
        device = self.inputs[0].device
        if self.stats and self.stats[0][0].device != device:  # once, at the first step: none copied in a later one
            self.stats = [(m.to(device), v.to(device)) for m, v in self.stats]
        return torch.stack([position_kl(x, m, v, 0.0) for x, (m, v) in zip(self.inputs, self.stats)]).sum()


def upsample(x: Tensor, size: int) -> Tensor:
    """Bicubic resize of the spatial dims to size × size (`functions.Scale`)."""
    return F.interpolate(x, size=(size, size), mode="bicubic")
