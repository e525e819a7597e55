"""Each inversion-side loss term against its reference implementation's formula, written out by hand here
(not by calling our code): ABD (GT-RIPL/AlwaysBeDreaming-DFCIL), R-DFCIL + cl-lite, NVlabs/DeepInversion."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import student_at_second_task
from torch import nn

from cl_inversion.inversion.common import BNStatistics, abd_blur_kernel, frozen_eval, gaussian_blur, total_variation_l2
from cl_inversion.inversion.generator import GeneratorInversion
from cl_inversion.inversion.pixel import PixelInversion
from cl_inversion.inversion.replay import BufferReplay
from cl_inversion.methods import ABD, RDFCIL, DeepInversion, LwF
from cl_inversion.methods.base import distillation
from cl_inversion.methods.relation import RelationProjection
from cl_inversion.models import CifarResNet, IncrementalClassifier


def trained_like_resnet(variant: str = "abd") -> nn.Module:
    """A ResNet-32 whose BN running statistics are not the defaults (as after training)."""
    torch.manual_seed(0)
    net = IncrementalClassifier(CifarResNet(32, in_channels=3, width=4, variant=variant))
    net.grow(5)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return net.eval()


# --- ABD generator: BN statistics averaged over layers ------------------------------------------------
def abd_r_feature(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """ABD `DeepInversionFeatureHook.hook_fn`, written out."""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False) + 1e-8
    rv, rm = bn.running_var + 1e-8, bn.running_mean
    return torch.log(var**0.5 / rv**0.5).mean() - 0.5 * (1.0 - (rv + (rm - mean) ** 2) / var).mean()


def test_generator_bn_term_is_50_times_the_mean_over_layers_of_abds_per_layer_kl():
    teacher = trained_like_resnet()
    inputs: dict[nn.Module, torch.Tensor] = {}
    layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, i, o: inputs.__setitem__(mod, i[0])) for m in layers]
    engine = GeneratorInversion(bn_weight=50.0, content_weight=0.0, diversity_weight=0.0, smooth_weight=0.0)
    images = torch.randn(8, 3, 8, 8)
    with frozen_eval(teacher), BNStatistics(teacher) as bn:
        terms = engine.loss_terms(teacher, bn, images, 5)
    for h in hooks:
        h.remove()
    per_layer = [abd_r_feature(inputs[m], m) for m in layers]
    reference = sum(r * 50.0 / len(per_layer) for r in per_layer)  # `r_feature_weight / len(hooks)` per hook
    assert len(layers) == 31  # ABD's ResNet-32
    assert torch.allclose(terms["bn"] * 50.0, reference, rtol=1e-5)
    assert torch.allclose(terms["loss"], reference, rtol=1e-5)
    summed = GeneratorInversion(bn_reduction="sum", content_weight=0, diversity_weight=0, smooth_weight=0)
    with frozen_eval(teacher), BNStatistics(teacher) as bn:
        assert torch.allclose(summed.loss_terms(teacher, bn, images, 5)["bn"], sum(per_layer), rtol=1e-5)


def test_generator_content_diversity_and_smoothness_terms_match_abd():
    teacher = trained_like_resnet()
    engine = GeneratorInversion()
    images = torch.randn(6, 3, 8, 8)
    with frozen_eval(teacher), BNStatistics(teacher) as bn:
        terms = engine.loss_terms(teacher, bn, images, 5)
        outputs = teacher(images)[:, :5]
    content = F.cross_entropy(outputs / 1000.0, outputs.argmax(1))
    p = F.softmax(outputs, dim=1).mean(0)
    diversity = 1.0 + (p * torch.log(p) / math.log(5)).sum()
    # ABD's Gaussiansmoothing(3, 5, 1) on reflect-padded images, kernel built as in its constructor
    grid = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    kernel = torch.ones(5, 5)
    for g in grid:
        kernel = kernel * (1 / (1.0 * math.sqrt(2 * math.pi)) * torch.exp(-(((g - 2.0) / (2 * 1.0)) ** 2)))
    kernel = kernel / kernel.sum()
    smooth_ref = F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), kernel.expand(3, 1, 5, 5), groups=3)
    assert torch.allclose(terms["content"], content, rtol=1e-5)
    assert torch.allclose(terms["diversity"], diversity, atol=1e-6)
    assert torch.allclose(terms["smooth"], F.mse_loss(images, smooth_ref), rtol=1e-5)
    assert torch.allclose(abd_blur_kernel(), kernel, atol=1e-7)
    assert torch.allclose(gaussian_blur(images), smooth_ref, atol=1e-6)
    # the reference kernel is wider than a true sigma-1 Gaussian: effective sigma ~1.17 after truncation
    x = torch.arange(5.0) - 2
    k1 = kernel.sum(0)
    assert math.sqrt(float((k1 * x**2).sum())) == pytest.approx(1.17, abs=0.01)


# --- KD without T² (ABD's baselines) ------------------------------------------------------------------
def test_distillation_is_abds_unnormalised_kd():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    T = 2.0
    ref = -(F.softmax(t / T, dim=1) * F.log_softmax(s / T, dim=1)).sum(dim=1).mean()  # loss_fn_kd, no * T**2
    assert torch.allclose(distillation(s, t, T), ref)
    assert torch.allclose(distillation(s, t, T, t_squared=True), ref * 4)


def after_first_task(cls, **kwargs):
    m = student_at_second_task(cls, **kwargs)
    m.net.eval()  # fixed BN statistics: the by-hand forward below sees the same logits
    return m


def test_lwf_loss_is_abds_lwf_update():
    m = after_first_task(LwF)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([4, 5] * 3)
    terms = m.loss(x, y)
    logits = m.net(x)[:, :6]
    old = m.previous(x)[:, :4]
    kd = -(F.softmax(old / 2, 1) * F.log_softmax(logits[:, :4] / 2, 1)).sum(1).mean()
    assert torch.allclose(terms["loss"], F.cross_entropy(logits, y) + 1.0 * kd, atol=1e-6)


def test_deepinversion_student_is_abds_deepinversiongenbn_update():
    m = after_first_task(DeepInversion)
    m.receive_replay(BufferReplay(torch.randn(12, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 3)))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([4, 5] * 3)
    torch.manual_seed(3)
    terms = m.loss(x, y)
    torch.manual_seed(3)
    rx, _ = m.replay.sample(6)
    logits = m.net(torch.cat([x, rx]))[:, :6]
    target = m.previous(torch.cat([x, rx]))[:, :4]
    ce = F.cross_entropy(logits[:6], y)  # dw off: weights 1
    kd_old = -(F.softmax(target[:6] / 2, 1) * F.log_softmax(logits[:6, :4] / 2, 1)).sum(1).mean()
    soft = torch.cat([F.softmax(target / 2, 1), torch.zeros(12, 2)], 1)  # zero-padded for the new classes
    kd_new = -(soft[6:] * F.log_softmax(logits[6:] / 2, 1)).sum(1).mean()
    assert torch.allclose(terms["loss"], ce + kd_old + kd_new, atol=1e-6)


def abd_step(m):
    """ABD's loss on 6 real images of task 1 + 6 replayed, and that batch (the replay drawn again, same seed)."""
    m.receive_replay(BufferReplay(torch.randn(12, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 3)))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([4, 5] * 3)
    torch.manual_seed(3)
    terms = m.loss(x, y)
    torch.manual_seed(3)
    rx, ry = m.replay.sample(6)
    return terms, x, y, torch.cat([x, rx]), torch.cat([y, ry])


def test_abd_student_loss_by_hand():
    m = after_first_task(ABD)
    terms, x, y, inputs, targets = abd_step(m)
    f = m.net.features(inputs)
    logits = m.net.head(f)
    w = torch.where(targets < 4, 4 / 6, 2 / 6)
    local = (F.cross_entropy(logits[:6, 4:6], y - 4, reduction="none") * w[:6]).mean()
    head = (F.cross_entropy(logits[:, :6], targets, reduction="none") * w).mean()
    W_old, b_old = m.previous.head.weight, m.previous.head.bias
    f_prev = m.previous.features(inputs)
    kd = ((f @ W_old.T + b_old) - (f_prev @ W_old.T + b_old)).pow(2).sum(1).mean() / 4
    assert torch.allclose(terms["loss"], local + head + 0.1 * kd, atol=1e-6)


# --- R-DFCIL relation distillation --------------------------------------------------------------------
def angle_matrix_by_loops(e: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_j − e_i, e_k − e_i) for every (i, j, k), as cl-lite's bmm of normalised differences."""
    n = len(e)
    out = torch.zeros(n, n, n)
    for i, j, k in itertools.product(range(n), repeat=3):
        a, b = e[j] - e[i], e[k] - e[i]
        na, nb = a.norm().clamp(min=1e-12), b.norm().clamp(min=1e-12)
        out[i, j, k] = (a / na) @ (b / nb)
    return out.flatten()


def test_relation_loss_is_l1_between_angle_matrices_of_both_projected_features():
    torch.manual_seed(0)
    proj = RelationProjection(6, 12)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    ps = s @ proj.student.weight.T + proj.student.bias
    pt = t @ proj.teacher.weight.T + proj.teacher.bias
    ref = (angle_matrix_by_loops(ps) - angle_matrix_by_loops(pt)).abs().mean()  # F.l1_loss
    assert torch.allclose(proj(s, t), ref, atol=1e-6)


def test_rdfcil_projection_is_fresh_each_task_and_twice_the_feature_width():
    m = after_first_task(RDFCIL)
    first = m.projection
    assert first.student.out_features == 2 * m.net.backbone.feature_dim
    m.begin_task(2, 2, None)
    assert m.projection is not first
    assert any(p is m.projection.teacher.weight for p in m.trainable_parameters())


def test_rdfcil_balancing_weights_come_from_counted_labels():
    m = after_first_task(RDFCIL)
    m.receive_replay(BufferReplay(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])))
    m.count_labels(torch.tensor([4, 4, 5, 5, 4, 5]), torch.tensor([0, 0, 1, 2, 3, 3]))
    m.on_train_epoch_end()
    counts = torch.tensor([2.0, 1, 1, 2, 3, 3])
    w = counts.sum() / counts
    assert torch.allclose(m.class_weights, w / w.min())
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([4, 5, 4, 5])
    rx, ry = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    terms = m.balancing_loss(x, y, rx, ry)
    with torch.no_grad():
        logits = m.net.head(m.net.features(torch.cat([x, rx])))[:, :6]
    t = torch.cat([y, ry])
    weights = (w / w.min())[t]
    ce = (weights * F.cross_entropy(logits, t, reduction="none")).sum() / weights.sum()  # weight= mean
    assert torch.allclose(terms["balanced_ce"], 0.5 * ce, atol=1e-6)  # λ_ce = 0.5


# --- NVlabs DeepInversion (CIFAR script) -------------------------------------------------------------
def test_tv_prior_is_nvlabs_sum_of_four_l2_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    diff1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    diff2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    diff3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    diff4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    ref = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    assert torch.allclose(total_variation_l2(x), ref)


def test_pixel_bn_term_is_nvlabs_norms_summed_over_layers():
    teacher = trained_like_resnet()
    inputs: dict[nn.Module, torch.Tensor] = {}
    layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, i, o: inputs.__setitem__(mod, i[0])) for m in layers]
    with frozen_eval(teacher), BNStatistics(ours := teacher) as bn:
        ours(torch.randn(8, 3, 8, 8))
        term = bn.norm_distance(first_multiplier=1.0)
    for h in hooks:
        h.remove()
    ref = 0
    for m in layers:
        x = inputs[m]
        var = x.permute(1, 0, 2, 3).contiguous().view([x.shape[1], -1]).var(1, unbiased=False)
        ref = ref + torch.norm(m.running_var - var, 2) + torch.norm(m.running_mean - x.mean([0, 2, 3]), 2)
    assert torch.allclose(term, ref, rtol=1e-5)


def test_pixel_engine_defaults_are_the_cifar_script(compose):
    cfg = compose(["method=deepinversion", "profile=published"])
    engine = PixelInversion(**{k: v for k, v in cfg.inversion.pixel.items() if k != "_target_"})
    assert engine.betas == (0.9, 0.999) and engine.lr_schedule == "constant" and engine.lr == 0.05
    assert engine.first_bn_multiplier == 1.0 and engine.flip is False and engine.jitter == 2
    assert (engine.bn_weight, engine.tv_weight, engine.steps, engine.batch_size) == (10.0, 2.5e-5, 2000, 256)


# --- ResNet-32 variants -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant,bn_layers", [("abd", 31), ("cl_lite", 31), ("projection", 33)])
def test_resnet32_variants_bn_counts_and_shortcuts(variant, bn_layers):
    net = CifarResNet(32, in_channels=3, variant=variant)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == bn_layers
    block = net.stages[1][0]  # 16 → 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    if variant == "abd":  # F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
        assert torch.equal(out, F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    if variant == "cl_lite":  # torch.cat((x, x.mul(0)), 1) after x[..., ::2, ::2]
        sub = x[..., ::2, ::2]
        assert torch.equal(out, torch.cat((sub, sub.mul(0)), 1))


def test_cl_lite_resnet_has_no_relu_after_the_addition_and_its_head_is_rdfcils():
    torch.manual_seed(0)
    backbone = CifarResNet(32, in_channels=3, variant="cl_lite")
    assert all(float(b.bn2.weight.abs().sum()) == 0 for s in backbone.stages for b in s)
    with torch.no_grad():
        for s in backbone.stages:
            for b in s:
                b.bn2.weight.fill_(1.0)
        assert (backbone.stages[2](backbone.stages[1](backbone.stages[0](torch.randn(2, 16, 8, 8)))) < 0).any()
    net = IncrementalClassifier(backbone)
    layer = net.grow(100)
    assert layer.bias is None and net.head.bias is None
    assert layer.weight.std().item() == pytest.approx(0.001, rel=0.1)
    abd = IncrementalClassifier(CifarResNet(32, in_channels=3, variant="abd"))
    layer = abd.grow(100)
    assert layer.bias is not None
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)  # Kaiming normal, fan-in 64


def test_abd_head_over_all_outputs_is_the_reference_codes_head_loss():
    """ABD `learners/datafree.py` `update_model`: `criterion(self.model.last(feat_class), targets, dw_cls)` with
    `last` an nn.Linear over every class of the dataset (digits: 10), features detached."""
    m = after_first_task(ABD, head_classes="all")
    assert m.net.head.out_features == 6 and m.unseen.out_features == 4  # 4 + 2 seen, 4 not shown yet
    terms, _, _, inputs, targets = abd_step(m)
    f = m.net.features(inputs)
    last_weight = torch.cat([m.net.head.weight, m.unseen.weight])  # the reference's one nn.Linear(·, 10)
    last_bias = torch.cat([m.net.head.bias, m.unseen.bias])
    w = torch.where(targets < 4, 4 / 6, 2 / 6)
    head = (F.cross_entropy(f @ last_weight.T + last_bias, targets, reduction="none") * w).mean()
    assert torch.allclose(terms["head_ce"], head, atol=1e-6)


def test_abd_head_over_all_outputs_hands_the_unseen_rows_to_each_new_task():
    m = student_at_second_task(ABD, head_classes="all")
    assert m.unseen.weight.requires_grad and any(p is m.unseen.weight for p in m.trainable_parameters())
    rows = m.unseen.weight.detach().clone()
    x, y = torch.randn(8, 1, 8, 8), torch.arange(6).repeat(2)[:8]
    features = m.net.features(x)  # no replay yet: the first task's form, CE over all 10 outputs
    logits = torch.cat([m.net.head(features), m.unseen(features)], dim=1)
    assert torch.allclose(m.loss(x, y)["ce"], F.cross_entropy(logits, y), atol=1e-6)
    from cl_inversion.data import ClassIncrementalScenario, digits

    m.end_task(None)
    m.begin_task(2, 2, ClassIncrementalScenario(digits(), n_tasks=4, first_task_classes=4).datamodule(2, 8))
    assert torch.equal(m.net.head.slices[-1].weight, rows[:2]) and torch.equal(m.unseen.weight, rows[2:])
    state = m.extra_state()
    fresh = student_at_second_task(ABD, head_classes="all")
    fresh.load_extra_state(state)
    assert torch.equal(fresh.unseen.weight, rows[2:])
    with pytest.raises(ValueError, match="method.head_classes='some'.*seen, all"):
        student_at_second_task(ABD, head_classes="some")
