"""PMI's per-layer engine and student against its authors' code (RuilinTong/PMI-CFS-DFCL at 2913603,
`ResNet-32/inversion/class_wise_image_for_contrastive.py`, `continual_runner/task_contrastive_cl_runner.py`;
`.pyc`-only modules from the REMIX fork d1f7f86: `inversion/functions.py`, `continual_runner/finetuning.py`,
`continual_runner/losses.py`), each reference formula written out by hand here. The feature model (CFS) is in
`tests/inversion/test_pmi_features.py`."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import student_at_second_task
from torch import nn

from cl_inversion.inversion.per_layer import (
    BatchNormInputs,
    PerLayerInversion,
    block_start,
    full_phase_lr,
    kl_to_gaussian,
)
from cl_inversion.inversion.replay import BufferReplay
from cl_inversion.methods import PMI
from cl_inversion.methods.pmi import Stage, pmi_loss_factors, scaled_epochs
from cl_inversion.models import CifarResNet, IncrementalClassifier

RTOL = 1e-6


def trained_like(width: int = 4) -> nn.Module:
    """cl-lite's ResNet-32 (PMI's) with BN running statistics away from their defaults, in eval mode."""
    torch.manual_seed(0)
    net = IncrementalClassifier(CifarResNet(32, in_channels=3, width=width, variant="cl_lite"))
    net.grow(4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.train()
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return net.eval().requires_grad_(False)


# --- reference formulas ---------------------------------------------------------------------------------
def ref_modified_bn_kl(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """`ModifiedBNInputHook.stats_regularization` (= `KLDivergence.compute_loss` with mean/var given)."""
    mean = x.mean([0, 2, 3])
    nch = x.shape[1]
    value = x.permute(1, 0, 2, 3).contiguous().view([nch, -1])
    var = value.var(1, unbiased=False) + 1e-8
    r = torch.log(running_var) - torch.log(var + 1e-8) - (1 - (var + (mean - running_mean) ** 2) / running_var)
    return r.mean() * 0.5


class RefWarmupScheduler:
    """`WarmupScheduler` as written in the reference, around a torch `MultiStepLR`."""

    def __init__(self, optimizer, scheduler, warmup, lr):
        self.warmup, self.optimizer, self.scheduler, self.lr, self.epoch = warmup, optimizer, scheduler, lr, 0
        for group in optimizer.param_groups:
            group["lr"] = self.lr * (self.epoch + 1) / max(self.warmup, 1)

    def step(self, i=-1):
        if self.epoch < self.warmup:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * (self.epoch + 1) / self.warmup
        else:
            self.scheduler.step()
        self.epoch += 1


def ref_inversion(inputs, target, forward, hooks, input_loss, iters, opt, scheduler, alpha_feat, base, boost=True,
                  extra=None, mse=F.mse_loss):
    """`ClassWiseContrastiveInversion.inversion` (hook_type 'kl', mse_type 'l2', return_best=True); `extra` and
    `mse` are our options' additions (None / plain MSE: the reference)."""
    best_loss, best_inputs = None, None
    alpha_mse, alpha_rf, alpha_in = 1.0, alpha_feat, alpha_feat
    init = {}
    for i in range(iters):
        out = forward(inputs)
        l_stat = torch.stack([ref_modified_bn_kl(x, bn.running_mean, bn.running_var) for bn, x in hooks()]).sum()
        l_mse = mse(out, target)
        if i == 0:
            init["mse"], init["stat"] = l_mse.item(), l_stat.item()
        else:
            if l_mse.item() > init["mse"] and boost:
                alpha_mse = min(alpha_mse * 2, 10)
            if l_stat.item() > init["stat"] and boost:
                alpha_rf = min(alpha_rf * 2, 10 * base)
        loss = alpha_mse * l_mse + alpha_rf * l_stat
        l_in = None
        if input_loss is not None:
            l_in = input_loss(inputs)
            if i == 0:
                init["in"] = l_in.item()
            elif l_in.item() > init["in"] and boost:
                alpha_in = min(alpha_in * 2, 5 * base)
            loss = loss + alpha_in * l_in
        if extra is not None:
            loss = loss + extra(inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cmp_loss = l_mse.item() + base * l_stat.item() + (base * l_in.item() if l_in is not None else 0.0)
        if best_loss is None or best_loss > cmp_loss:
            best_loss, best_inputs = cmp_loss, inputs.clone().detach()
        if scheduler is not None:
            scheduler.step(i)
    return best_inputs, best_loss


class Recorder:
    """Keeps the input of every BatchNorm layer of a module (the reference's hooks)."""

    def __init__(self, module):
        self.layers = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        self.inputs = {}
        self.handles = [bn.register_forward_hook(lambda m, i, o: self.inputs.__setitem__(m, i[0]))
                        for bn in self.layers]

    def __call__(self):
        return [(bn, self.inputs[bn]) for bn in self.layers]

    def remove(self):
        for h in self.handles:
            h.remove()


# --- engine ---------------------------------------------------------------------------------------------
def test_bn_kl_and_input_prior_equal_the_reference_hook():
    torch.manual_seed(1)
    x = torch.randn(6, 5, 4, 4) * 1.7 + 0.3
    rm, rv = torch.randn(5), torch.rand(5) + 0.2
    assert torch.allclose(kl_to_gaussian(x, rm, rv), ref_modified_bn_kl(x, rm, rv), rtol=RTOL)
    net = trained_like()
    block = net.backbone.blocks()[3]
    with BatchNormInputs(block) as ours:
        u = torch.randn(4, *block_input_shape(net, 3))
        block(u)
        got = ours.kl()
    recorder = Recorder(block)
    block(u)
    expected = torch.stack([ref_modified_bn_kl(x, bn.running_mean, bn.running_var) for bn, x in recorder()]).sum()
    recorder.remove()
    assert len(recorder.layers) == 2 and torch.allclose(got, expected, rtol=RTOL)


def block_input_shape(net, k):
    x = torch.zeros(1, 3, 8, 8)
    for block in net.backbone.blocks()[:k]:
        x = block(x)
    return x.shape[1:]


def test_full_phase_lr_follows_the_warmup_scheduler_around_multistep():
    x = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.4)
    step = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[80, 120], gamma=0.5)
    scheduler = RefWarmupScheduler(opt, step, warmup=5, lr=0.4)
    used = []
    for i in range(160):
        used.append(opt.param_groups[0]["lr"])
        x.grad = torch.zeros(1)
        opt.step()
        scheduler.step(i)
    ours = [full_phase_lr(i, 0.4, 5, [80, 120], 0.5) for i in range(160)]
    assert ours == pytest.approx(used, rel=1e-12)
    assert used[0] == used[1] == pytest.approx(0.08) and used[84] == 0.4 and used[85] == 0.2 and used[125] == 0.1


def test_block_start_is_the_preceding_batchnorms_gaussian_and_its_prior():
    net = trained_like()
    bn = net.backbone.blocks()[2].bn2
    torch.manual_seed(3)
    start, prior = block_start(bn, 5, torch.Size([4, 8, 8]), torch.device("cpu"))
    torch.manual_seed(3)
    w = bn.weight.view(1, -1, 1, 1)
    b = bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(start, torch.randn(5, 4, 8, 8) * w + b, rtol=RTOL)
    assert torch.allclose(prior(start), ref_modified_bn_kl(start, bn.bias, bn.weight**2), rtol=RTOL)
    image, none = block_start(None, 2, torch.Size([3, 8, 8]), torch.device("cpu"))
    assert none is None and image.shape == (2, 3, 8, 8)


def test_resnet32_blocks_and_unfreeze_groups_are_pmis():
    backbone = CifarResNet(32, variant="cl_lite")
    blocks = backbone.blocks()
    assert len(blocks) == 16  # get_all_blocks: block0 (conv_1_3x3, bn_1, ReLU) + 5 + 5 + 4 + 1 residual blocks
    groups = backbone.unfreeze_groups()  # stage_4, stage_3, stage_2, stage_1 (+ conv_1_3x3, bn_1)
    assert [sum(1 for m in g for b in m.modules() if b.__class__.__name__ == "BasicBlock") for g in groups] \
        == [1, 4, 5, 5]
    assert groups[0][0] is blocks[-1] and groups[-1][-1] is backbone.stem


@pytest.mark.parametrize("boost", [True, False])
def test_block_inversion_equals_the_reference_loop(boost):
    """One residual block's input (with the preceding BN's prior), and the last block with pooling."""
    net = trained_like()
    blocks = net.backbone.blocks()
    engine = PerLayerInversion(layer_steps=12, boost=boost, progress=False)
    for k, pool in ((5, False), (len(blocks) - 1, True)):
        shape = block_input_shape(net, k)
        torch.manual_seed(k)
        with torch.no_grad():
            target = blocks[k](torch.randn(6, *shape) * 0.5 + 0.2)
            target = target.mean((2, 3)) if pool else target
        forward = (lambda u, b=blocks[k]: b(u).mean((2, 3))) if pool else blocks[k]
        prior_bn = blocks[k - 1].bn2
        start, prior = block_start(prior_bn, 6, shape, torch.device("cpu"))
        weight, lr = 0.25 * len(blocks) * 20.0, 0.8
        with BatchNormInputs(blocks[k]) as bn:
            ours, ours_loss, _ = engine.optimise(start, target, forward, bn, prior, 12, lambda _, lr=lr: lr, weight,
                                                 weight, 1.0, DummyProgress(), {})
        inputs = start.clone().requires_grad_(True)
        recorder = Recorder(blocks[k])
        expected, expected_loss = ref_inversion(
            inputs, target, forward, recorder,
            lambda u, bn=prior_bn: ref_modified_bn_kl(u, bn.bias, bn.weight**2),
            12, torch.optim.Adam([inputs], lr=lr), None, weight, weight, boost)
        recorder.remove()
        assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
        assert float(ours_loss) == pytest.approx(expected_loss, rel=1e-5)


def test_full_model_phase_equals_the_reference_loop():
    net = trained_like()
    engine = PerLayerInversion(full_steps=20, warmup=5, milestones=[6, 10], progress=False)
    engine.setup((3, 8, 8), (torch.full((3,), -3.0), torch.full((3,), 3.0)))
    torch.manual_seed(4)
    image = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        target = net.features(torch.randn(6, 3, 8, 8))
    labels = torch.zeros(6, dtype=torch.long)
    ours = engine.invert_full(net, image, target, labels)
    inputs = image.clone().requires_grad_(True)
    opt = torch.optim.Adam([inputs], lr=0.4)
    scheduler = RefWarmupScheduler(opt, torch.optim.lr_scheduler.MultiStepLR(opt, [6, 10], 0.5), 5, 0.4)
    recorder = Recorder(net)
    expected, _ = ref_inversion(inputs, target, lambda x: net.backbone(x), recorder, None, 20, opt, scheduler,
                                0.25, 0.25)
    recorder.remove()
    assert len(recorder.layers) == 31 and torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_options_of_ours_add_ce_and_tv_or_use_the_relative_block_mse():
    """`ce_weight`/`tv_weight` add CE to the label and NVlabs's TV to the full-model loss; `block_mse=relative`
    divides a block's MSE by the target's mean square. Off (0 / plain) they are the reference loop above."""
    from cl_inversion.inversion.common import total_variation_l2

    net = trained_like()
    engine = PerLayerInversion(full_steps=8, ce_weight=0.5, tv_weight=1e-3, progress=False)
    torch.manual_seed(4)
    image = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        target = net.features(torch.randn(6, 3, 8, 8))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ours = engine.invert_full(net, image, target, labels)
    inputs = image.clone().requires_grad_(True)
    opt = torch.optim.Adam([inputs], lr=0.4)
    scheduler = RefWarmupScheduler(opt, torch.optim.lr_scheduler.MultiStepLR(opt, [80, 120], 0.5), 5, 0.4)
    recorder = Recorder(net)
    last = {}

    def forward(x):
        last["features"] = net.backbone(x)
        return last["features"]

    extra = (lambda x: 0.5 * F.cross_entropy(net.head(last["features"]), labels) + 1e-3 * total_variation_l2(x))
    expected, _ = ref_inversion(inputs, target, forward, recorder, None, 8, opt, scheduler, 0.25, 0.25, extra=extra)
    recorder.remove()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)

    block = net.backbone.blocks()[4]
    shape = block_input_shape(net, 4)
    with torch.no_grad():
        target = block(torch.randn(5, *shape))
    start = torch.randn(5, *shape)
    relative = PerLayerInversion(block_mse="relative", progress=False)
    with BatchNormInputs(block) as bn:
        ours, _, _ = relative.optimise(start, target, block, bn, None, 6, lambda _: 0.8, 80.0, 80.0, 1.0,
                                       DummyProgress(), {}, mse="relative")
    inputs = start.clone().requires_grad_(True)
    recorder = Recorder(block)
    expected, _ = ref_inversion(inputs, target, block, recorder, None, 6, torch.optim.Adam([inputs], lr=0.8), None,
                                80.0, 80.0, mse=lambda o, t: F.mse_loss(o, t) / (t.pow(2).mean() + 1e-8))
    recorder.remove()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_layer_wise_inversion_walks_blocks_last_first_with_pmis_weights():
    """`layer_wise_inversion_for_cl` (search_param 0): block i's kept input is block i-1's target, α_rf·16·20."""
    net = trained_like()
    blocks = net.backbone.blocks()
    engine = PerLayerInversion(layer_steps=3, progress=False)
    engine.setup((3, 8, 8), (torch.full((3,), -3.0), torch.full((3,), 3.0)))
    torch.manual_seed(5)
    target = torch.randn(4, net.backbone.feature_dim)
    torch.manual_seed(6)
    ours = engine.invert_layers(net, target)
    torch.manual_seed(6)
    out, weight = target, 0.25 * len(blocks) * 20.0
    for i in range(len(blocks) - 1, -1, -1):
        shape = block_input_shape(net, i)
        if i == 0:
            inputs, prior = torch.randn(4, *shape), None
        else:
            bn = [m for m in blocks[i - 1].modules() if isinstance(m, nn.BatchNorm2d)][-1]
            inputs = torch.randn(4, *shape) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
            prior = (lambda u, bn=bn: ref_modified_bn_kl(u, bn.bias, bn.weight**2))
        forward = (lambda u, b=blocks[i]: b(u).mean((2, 3))) if i == len(blocks) - 1 else blocks[i]
        inputs = inputs.detach().requires_grad_(True)
        recorder = Recorder(blocks[i])
        out, _ = ref_inversion(inputs, out, forward, recorder, prior, 3, torch.optim.Adam([inputs], lr=0.8), None,
                               weight, weight)
        recorder.remove()
    assert torch.allclose(ours, out, rtol=1e-4, atol=1e-5)


class DummyProgress:
    def update(self, *args, **kwargs):
        pass


# --- student --------------------------------------------------------------------------------------------
def test_loss_factors_are_the_runners():
    n_old, n_new = 20, 10
    alpha = math.log(n_new / 2 + 1, 2)
    beta = math.sqrt(n_old / n_new)
    got = pmi_loss_factors(n_old, n_new, ce=0.75, hkd=0.15, rkd=0.5, ft=1.5)
    assert got == pytest.approx({"ce": 0.75 * (1 + 1 / alpha) / beta, "ft": 1.5 * (1 + 1 / alpha) / beta,
                                 "hkd": 0.15 * alpha * beta, "rkd": 0.5 * alpha * beta}, rel=1e-12)


def test_stage_epochs_scale_to_the_budget():
    assert scaled_epochs([20, 20, 0, 0, 120, 40], 200) == [20, 20, 0, 0, 120, 40]
    assert scaled_epochs([20, 20, 0, 0, 120, 40], 40) == [4, 4, 0, 0, 24, 8]
    assert scaled_epochs([20, 20, 0, 0, 120, 40], 15) == [2, 1, 0, 0, 9, 3]
    assert scaled_epochs([20, 20, 120, 40], 3) == [1, 1, 1, 0] or sum(scaled_epochs([20, 20, 120, 40], 3)) == 3


def pmi_student(**kwargs):
    m = student_at_second_task(PMI, **kwargs)
    torch.manual_seed(9)
    m.receive_replay(BufferReplay(torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,)), replacement=False))
    return m


def reference_terms(m, x, y, replay_x, replay_y):
    feat = m.net.backbone(x)
    out = m.net.head(feat)
    feat_inv = m.net.backbone(replay_x)
    out_inv = m.net.head(feat_inv)
    local = F.cross_entropy(out[:, m.n_old:], y - m.n_old)  # LocalCELoss
    teacher_logit = m.previous(replay_x)
    hkd = F.l1_loss(out_inv[:, : m.n_old], teacher_logit)
    ft = F.cross_entropy(m.net.head(torch.cat([feat.detach(), feat_inv.detach()])), torch.cat([y, replay_y]))
    p = m.projection
    s, t = p.student(feat), p.teacher(m.previous.backbone(x))
    angles = []
    for e in (s, t):
        d = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        angles.append(torch.bmm(d, d.transpose(1, 2)).view(-1))
    rkd = F.l1_loss(angles[0], angles[1])  # RelationKDLoss
    return local, hkd, ft, rkd


@pytest.mark.parametrize("combine", ["product", "sum"])
@pytest.mark.parametrize("unfrozen", [0, 2])
def test_stage_losses_equal_the_runners(combine, unfrozen):
    m = pmi_student(combine=combine, stage_epochs=[20, 20, 120], stage_lrs=[0.1, 0.05, 0.01])
    m.enter(Stage(unfrozen, 1, 0.1))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(4, 6, (8,))
    torch.manual_seed(11)
    got = m.replay_loss(x, y)
    torch.manual_seed(11)
    replay_x, replay_y = m.replay.sample(8)
    local, hkd, ft, rkd = reference_terms(m, x, y, replay_x, replay_y)
    f = pmi_loss_factors(4, 2, 0.75, 0.15, 0.5, 1.5)
    join = (lambda a, b: a * b) if combine == "product" else (lambda a, b: a + b)
    if unfrozen == 0:  # train_head: ce_factor·l_ce + hkd_factor·0.01·l_hkd·ft_factor·l_ft
        expected = f["ce"] * local + join(f["hkd"] * 0.01 * hkd, f["ft"] * ft)
    else:  # train_with_backbone: loss + hkd_factor·l_hkd + rkd_factor·l_rkd·ft_factor·l_ft
        expected = f["ce"] * local + f["hkd"] * hkd + join(f["rkd"] * rkd, f["ft"] * ft)
    assert torch.allclose(got["loss"], expected, rtol=RTOL)


def test_finetune_loss_is_class_weighted_ce_and_hkd_with_counted_labels():
    m = pmi_student()
    m.on_task_start(None)
    m.enter(Stage(-1, 1, 0.005))
    m.count(torch.tensor([4, 4, 5, 0, 1, 1, 1]))
    counts = torch.ones(6) + torch.bincount(torch.tensor([4, 4, 5, 0, 1, 1, 1]), minlength=6)
    m.on_train_batch_start(None, 0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(4, 6, (8,))
    torch.manual_seed(12)
    got = m.replay_loss(x, y)
    torch.manual_seed(12)
    replay_x, replay_y = m.replay.sample(8)
    weights = counts.sum() / counts.clamp(min=1)
    weights = weights / weights.min()
    out = torch.cat([m.net(x), m.net(replay_x)])
    ce = F.cross_entropy(out, torch.cat([y, replay_y]), weights)
    hkd = F.l1_loss(out[8:, :4], m.previous(replay_x))
    expected = 0.75 * ce + pmi_loss_factors(4, 2, 0.75, 0.15, 0.5, 1.5)["hkd"] * hkd
    assert torch.allclose(got["loss"], expected, rtol=RTOL)


def test_stages_train_what_the_runner_trains():
    m = pmi_student(stage_epochs=[20, 20, 120], stage_lrs=[0.1, 0.05, 0.01])
    groups = m.net.backbone.unfreeze_groups()
    plan = m.plan()
    assert [(s.name, s.epochs, s.lr, s.milestones) for s in plan] == [
        ("head", 20, 0.1, []), ("groups_1", 20, 0.05, [10, 15]), ("groups_2", 120, 0.01, [60, 90]),
        ("finetune", 40, 0.005, [])]
    head_slice = set(map(id, m.net.head.slices[-1].parameters()))
    for stage in plan:
        m.enter(stage)
        optimizer = m.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert optimizer.param_groups[0]["lr"] == stage.lr and optimizer.param_groups[0]["momentum"] == 0.0
        if stage.unfrozen == -1:
            assert params == set(map(id, m.net.head.parameters())) and not m.net.backbone.training
        else:
            unfrozen = {id(p) for g in groups[: stage.unfrozen] for mod in g for p in mod.parameters()}
            projection = set(map(id, m.projection.parameters())) if stage.unfrozen else set()
            assert params == head_slice | unfrozen | projection
            trainable = {id(p) for p in m.net.backbone.parameters() if p.requires_grad}
            assert trainable == unfrozen
            assert all(mod.training for g in groups[: stage.unfrozen] for mod in g)
            assert all(not mod.training for g in groups[stage.unfrozen:] for mod in g)
    copy.deepcopy(m)  # a staged student stays copyable (frozen teacher copies)


def test_bad_stage_lists_are_refused():
    with pytest.raises(ValueError, match=r"method.stage_epochs=\[20, 20, 5, 0, 120\].*must be 0"):
        student_at_second_task(PMI, stage_epochs=[20, 20, 5, 0, 120], stage_lrs=[0.1, 0.05, 0.0, 0.0, 0.01])
    with pytest.raises(ValueError, match="method.combine='mul': choose one of product, sum"):
        student_at_second_task(PMI, combine="mul")


def test_crop_fill_mean_pads_with_what_normalising_first_would():
    """PMI's `seq_cifar100.py` normalises, then crops with 4 zero pixels of padding: the border is the mean colour."""
    from cl_inversion.data.datasets import crop_fill_values, crop_flip

    mean = (0.5071, 0.4867, 0.4408)
    image = torch.full((3, 8, 8), 2.0)  # a value no mean takes
    torch.manual_seed(0)
    outs = [crop_flip(fill=mean)(image) for _ in range(20)]
    border = [o[:, (o != 2.0).any(0)] for o in outs]
    assert any(b.shape[1] for b in border)  # some crops show the padding
    for b in border:
        assert torch.allclose(b, torch.tensor(mean).view(3, 1).expand_as(b))
    zero = crop_flip()(image)
    assert set(zero.unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="dataset.crop_fill='edge': choose one of zero, mean"):
        crop_fill_values("edge", mean)


# --- REMIX's NLL term in the same loops --------------------------------------------------------------------
def test_laplace_term_joins_the_loop_as_remix_does():
    """REMIX `inversion`: `+ alpha_frob · mean over hooks of NLL` in the loss and in the kept loss, not boosted."""
    from cl_inversion.inversion.covariance import LaplaceCovariance, LaplaceNLL

    net = trained_like()
    block = net.backbone.blocks()[4]
    shape = block_input_shape(net, 4)
    torch.manual_seed(7)
    with torch.no_grad():
        target = block(torch.randn(5, *shape))
    start = torch.randn(5, *shape)
    layers = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    models = [LaplaceCovariance(layer.num_features) for layer in layers]
    engine = PerLayerInversion(laplace_weight=0.5, progress=False)
    ours_hooks = [LaplaceNLL(layer, model) for layer, model in zip(layers, models)]
    with BatchNormInputs(block) as bn:
        ours, ours_loss, _ = engine.optimise(start, target, block, bn, None, 6, lambda _: 0.8, 80.0, 80.0, 1.0,
                                             DummyProgress(), {}, laplace=ours_hooks)
    for hook in ours_hooks:
        hook.remove()
    ref_hooks = [LaplaceNLL(layer, model) for layer, model in zip(layers, models)]
    inputs = start.clone().requires_grad_(True)
    recorder = Recorder(block)
    lap = (lambda _: 0.5 * sum(h.nll() for h in ref_hooks) / len(ref_hooks))
    best, best_loss, init = None, None, {}
    opt = torch.optim.Adam([inputs], lr=0.8)
    alpha_mse, alpha_rf = 1.0, 80.0
    for i in range(6):  # REMIX's loop written out, with the NLL term
        out = block(inputs)
        l_stat = torch.stack([ref_modified_bn_kl(x, m.running_mean, m.running_var) for m, x in recorder()]).sum()
        l_mse = F.mse_loss(out, target)
        l_lcm = lap(inputs) / 0.5
        if i == 0:
            init = {"mse": l_mse.item(), "stat": l_stat.item()}
        else:
            alpha_mse = min(alpha_mse * 2, 10) if l_mse.item() > init["mse"] else alpha_mse
            alpha_rf = min(alpha_rf * 2, 800.0) if l_stat.item() > init["stat"] else alpha_rf
        loss = alpha_mse * l_mse + alpha_rf * l_stat + 0.5 * l_lcm
        opt.zero_grad()
        loss.backward()
        opt.step()
        cmp_loss = l_mse.item() + 80.0 * l_stat.item() + 0.5 * l_lcm.item()
        if best_loss is None or best_loss > cmp_loss:
            best_loss, best = cmp_loss, inputs.clone().detach()
    recorder.remove()
    assert torch.allclose(ours, best, rtol=1e-5, atol=1e-6) and float(ours_loss) == pytest.approx(best_loss, rel=1e-5)


def test_observe_fits_one_laplace_covariance_per_bn_layer_and_checkpoints_it():
    """REMIX's runner: the streaming covariance of every backbone BN input over the (augmented) real images,
    its correlation as the first task's target, `fit_lcm_correlation`; the fits survive a state round trip."""
    from cl_inversion.inversion.covariance import LaplaceCovariance, StreamingCovariance

    net = trained_like()
    torch.manual_seed(8)
    real = [(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]))]
    engine = PerLayerInversion(laplace_weight=0.5, laplace_fit_epochs=3, contrastive_epochs=1, progress=False)
    engine.observe(net, real, None, None)
    layers = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(engine.laplace) == len(layers) == 31
    streams = [StreamingCovariance() for _ in layers]
    handles = [m.register_forward_hook(lambda mod, i, o, s=s: s.update(i[0])) for m, s in zip(layers, streams)]
    with torch.no_grad():
        net.backbone(real[0][0])
    for h in handles:
        h.remove()
    for k in (0, 17, 30):
        expected = LaplaceCovariance(layers[k].num_features)
        expected.fit(streams[k].correlation(), epochs=3, lr=0.01)
        assert torch.allclose(engine.laplace[k].a, expected.a, rtol=1e-5)
    copy_engine = PerLayerInversion(laplace_weight=0.5, progress=False)
    copy_engine.load_state_dict(engine.state_dict())
    assert all(torch.equal(a.w, b.w) for a, b in zip(copy_engine.laplace, engine.laplace))
