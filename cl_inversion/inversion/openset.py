"""PMI's open-set step on CLIP: image features of classes without data, projected from the Gaussians of the most
text-similar seen classes, then inverted through the pre-trained CLIP and learnt from.

Reference: pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel at d1f7f86, `CLIP/models/moe_adapter_open_world.py`
(`Learner.prototype_mapping`, `rotate_features`, `build_outset_inv_data`, `incremental_train`), with
`configs/moe_openset/cf100.yaml` (`open_feat_mode: proto_map`, `map_mode: txt_txt`, `open_feat_type: rand`,
`text_aug_mode: proto_map`, `proto_class: 5`, `openset_per_class: 20`, `shift_factor: 0.1`, `proto_shift: 0.0`).

For a new class with (raw CLIP, normalised) text feature t and the seen classes' text features t_i:
  1. the `top_k` seen classes of largest cosine t_i·t (no weights, no temperature);
  2. per such class i, `per_class` draws f = normalize(ε·std_i + mean_i), ε ~ N(0, 1), from its Gaussian of raw
     CLIP image features (per-dimension mean and biased std), each rotated in the plane of (t_i, t) by the angle
     from t_i to t (`rotate_features`);
  3. the k rotated sets averaged draw by draw and normalised;  4. each mixed with t: normalize((1−s)·f + s·t).
With `proto_shift: 0` the class descriptions (`des_cifar224.json`) do not enter; the text features are one prompt
per class here (the code's `utils/templates.json` ensemble is not in the repository).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_inversion.inversion.features import ClassGaussians
from cl_inversion.inversion.tokens import TokenStatistics, collect
from cl_inversion.utils.nn_utils import eval_mode


def rotate_features(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """Rotate the rows of `x` [n, d] in the plane of unit `a`, `b` [d] by the angle from a to b; the component
    orthogonal to that plane is kept (`rotate_features`; identity where the angle is 0 by `np.isclose`)."""
    cos_t = a @ b
    theta = torch.arccos(cos_t)
    if abs(float(theta)) <= 1e-8:
        return x.clone()
    v = b - cos_t * a
    v = v / v.norm()
    xa, xv = (x @ a)[:, None], (x @ v)[:, None]
    sin_t = torch.sin(theta)
    plane = (cos_t * xa - sin_t * xv) * a + (sin_t * xa + cos_t * xv) * v
    return plane + (x - xa * a - xv * v)


def project_open_set(old_text: Tensor, new_text: Tensor, gaussians: ClassGaussians, per_class: int, top_k: int,
                     shift: float) -> tuple[Tensor, Tensor]:
    """Target features of every new class (rows of `new_text`), `per_class` each, in class order, and the new
    classes' local indices (`prototype_mapping`); the Gaussians are indexed like the rows of `old_text`."""
    feats, labels = [], []
    for j, t in enumerate(new_text):
        order = torch.argsort(old_text @ t, descending=True)
        mapped = []
        for i in order[:top_k].tolist():
            eps = torch.randn(per_class, old_text.shape[1])
            f = F.normalize(eps * gaussians.std[i] + gaussians.mean[i], dim=-1)
            mapped.append(rotate_features(old_text[i], t, f))
        sub = F.normalize(torch.stack(mapped).mean(0), dim=-1)
        feats.append(F.normalize((1.0 - shift) * sub + shift * t, dim=-1))
        labels.append(torch.full((per_class,), j))
    return torch.cat(feats), torch.cat(labels)


def raw_text_features(head: nn.Module, start: int, end: int) -> Tensor:
    """Normalised text features of classes start..end through the text tower without experts (pre-trained CLIP)."""
    from cl_inversion.models.moe_clip import without_experts

    raw = without_experts(copy.deepcopy(head))
    with torch.no_grad(), eval_mode(raw):
        return raw.text_features(start, end).float().cpu()


class OpenSetModel:
    """What the open-set step keeps from the boundaries with data, all through pre-trained CLIP: the per-class
    Gaussians of image features (`raw_cls2stat`, `get_class_wise_distribution`) and the block-input statistics
    (`openset_inversion_runner.update_input_stat`)."""

    def __init__(self, per_class: int = 20, top_k: int = 5, shift: float = 0.1, bn_weight: float = 0.02,
                 input_tv_weight: float = 0.0, merge_limit: int | None = 14) -> None:
        self.per_class, self.top_k, self.shift = per_class, top_k, shift
        self.bn_weight, self.input_tv_weight = bn_weight, input_tv_weight
        self.gaussians = ClassGaussians()
        self.tokens = TokenStatistics(merge_limit)

    @torch.no_grad()
    def observe(self, raw: nn.Module, real_batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> None:
        """Gaussians of the new classes' raw image features and the raw model's block-input statistics."""
        feats, labels = [], []
        with eval_mode(raw):
            for x, y in real_batches:
                feats.append(raw(x.to(device)).float().cpu())
                labels.append(y.cpu())
            self.gaussians.fit(torch.cat(feats), torch.cat(labels))
            self.tokens.update(collect(raw.blocks(), real_batches, device))

    def targets(self, head: nn.Module, n_old: int, n_seen: int) -> tuple[Tensor, Tensor]:
        """Targets of classes n_old..n_seen (labels), shuffled together (`random.shuffle`), normalised."""
        old_text, new_text = raw_text_features(head, 0, n_old), raw_text_features(head, n_old, n_seen)
        feats, local = project_open_set(old_text, new_text, self.gaussians, self.per_class, self.top_k, self.shift)
        order = torch.randperm(len(local))
        return F.normalize(feats[order], dim=-1), local[order] + n_old

    def state_dict(self) -> dict:
        return {"gaussians": self.gaussians.state_dict(), "tokens": self.tokens.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gaussians.load_state_dict(state["gaussians"])
        self.tokens.load_state_dict(state["tokens"])
