"""PMI's CLIP learner and its per-block ViT inversion against the authors' code (the REMIX fork at d1f7f86,
`CLIP/`), each formula or loop written out by hand below in the reference's sequence-first layout, on the tiny
random open_clip model (no download)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_in_process

from cl_inversion.data import ClassIncrementalScenario, digits
from cl_inversion.inversion import PerLayerInversion
from cl_inversion.inversion.tokens import Moments, StatisticHooks, TokenStatistics, position_kl, total_variation_4
from cl_inversion.methods.moe_adapter import MoEAdapter, warmup_cosine
from cl_inversion.models import IncrementalClassifier, MoEClipBackbone
from cl_inversion.models.moe_clip import MoEBlock, is_expert_parameter


def randomise_experts(module: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if is_expert_parameter(name):
                p.copy_(torch.randn_like(p) * scale)


def reference_block(block: MoEBlock, x_lnd: torch.Tensor) -> torch.Tensor:
    """`ResidualAttentionBlock.forward` (eval: no noise) with `SparseDispatcher`, sequence-first."""
    b = block.block
    q = b.ln_1(x_lnd).transpose(0, 1)  # open_clip's attention is batch-first: its layout only, same weights
    x = x_lnd + b.attn(q, q, q, need_weights=False)[0].transpose(0, 1)
    x_re = x.permute(1, 0, 2)[:, 0, :]
    logits = x_re @ block.router
    top, idx = logits.topk(min(block.top_k + 1, logits.shape[1]), dim=1)
    gates = torch.zeros_like(logits).scatter(1, idx[:, : block.top_k], torch.softmax(top[:, : block.top_k], 1))
    flat = x.permute(1, 0, 2).reshape(x.shape[1], -1)
    y = torch.zeros_like(flat)
    for e, adapter in enumerate(block.adapters):
        rows = (gates[:, e] > 0).nonzero().flatten()
        tokens = flat[rows].view(len(rows), x.shape[0], x.shape[2])
        out = adapter.up_proj(F.relu(adapter.down_proj(tokens))) * 0.1
        y.index_add_(0, rows, out.reshape(len(rows), -1) * gates[rows, e : e + 1])
    y = y.view(x.shape[1], x.shape[0], x.shape[2])
    return x + b.mlp(b.ln_2(x)) + y.permute(1, 0, 2)


def test_expert_block_and_noisy_gates_equal_the_reference():
    torch.manual_seed(0)
    backbone = MoEClipBackbone("clip_tiny", in_channels=1)
    randomise_experts(backbone)
    block = backbone.visual.transformer.resblocks[0].eval()
    x = torch.randn(3, 17, 64)
    ours = block(x)
    assert torch.allclose(ours, reference_block(block, x.transpose(0, 1)).transpose(0, 1), atol=1e-5)
    block.train()
    torch.manual_seed(1)
    gates = block.gates(x[:, 0])
    torch.manual_seed(1)
    clean = x[:, 0] @ block.router
    noisy = clean + torch.randn_like(clean) * (F.softplus(x[:, 0] @ block.noise) + 1e-2)
    assert torch.allclose(gates, torch.softmax(noisy, 1), atol=1e-6)  # top-2 of 2 experts: a full softmax


def test_zero_initialised_experts_leave_clip_unchanged_and_only_experts_train():
    torch.manual_seed(0)
    backbone = MoEClipBackbone("clip_tiny", in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    plain = backbone.visual
    tokens = plain._embeds(backbone.preprocess(x))
    for block in plain.transformer.resblocks:
        tokens = block.block(tokens)
    expected = plain._pool(tokens)[0] @ plain.proj
    assert torch.allclose(backbone(x), expected, atol=1e-5)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(is_expert_parameter(n) for n in trainable)


def method_at_second_task(start_block: int = 1, router_noise: bool = True, **options) -> MoEAdapter:
    sc = ClassIncrementalScenario(digits(), n_tasks=2)
    torch.manual_seed(0)
    m = MoEAdapter(IncrementalClassifier(MoEClipBackbone("clip_tiny", in_channels=1, router_noise=router_noise)),
                   optimizer=None, start_block=start_block, **options)
    m.begin_task(0, 5, sc.datamodule(0, 8))
    m.end_task(sc.datamodule(0, 8))
    m.begin_task(1, 5, sc.datamodule(1, 8))
    randomise_experts(m.net)
    return m


class FixedReplay:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def sample(self, n):
        return self.x[:n], self.y[:n]


def reference_visual_from_block_1(visual, u):
    """`split_clip_blocks(split_cnn=True, normalize=True)[1:]`: PreTransformBlock, resblocks, PostTransformBlock."""
    x = u.reshape(u.shape[0], u.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        x = block(x)
    out = visual.ln_post(x[:, 0]) @ visual.proj
    return out / (out.norm(dim=-1, keepdim=True) + 1e-6)


def test_learner_losses_equal_the_reference_terms():
    """`_init_train` at task 1: CE on the new prompts, HKD with the student's old text features on both sides,
    TKD, FT on old and new, the change_factor weights (eval mode: no noise, no dropout)."""
    m = method_at_second_task()
    m.net.eval()
    x, y = torch.randn(6, 1, 8, 8), torch.arange(5, 11) % 5 + 5
    u, uy = torch.randn(6, 64, 4, 4), torch.arange(6) % 5
    m.receive_replay(FixedReplay(u, uy))
    out = m.loss(x, y)
    model, tok = m.net.head.text, m.net.head.tokenizer.fn
    texts = m.net.head.prompts
    assert texts[0].startswith("a bad photo of a ")

    def text(model, prompts):
        return F.normalize(model.encode_text(tok(prompts)), dim=-1)

    with torch.no_grad():
        scale = model.logit_scale.exp()
        all_ft, cur_ft, old_ft = text(model, texts), text(model, texts[5:]), text(model, texts[:5])
        image = F.normalize(m.net.backbone.visual(m.net.backbone.preprocess(x)), dim=-1)
        ce = F.cross_entropy(scale * image @ cur_ft.T, y - 5)
        old_fi = reference_visual_from_block_1(m.net.backbone.visual, u)
        teacher_fi = reference_visual_from_block_1(m.previous.backbone.visual, u)
        hkd = F.l1_loss(scale * old_fi @ old_ft.T, scale * teacher_fi @ old_ft.T)
        tkd = F.l1_loss(old_ft, text(m.previous.head.text, texts[:5]))
        ft_old = F.cross_entropy(scale * old_fi @ all_ft.T, uy)
        ft_new = F.cross_entropy(scale * image @ all_ft.T, y)
        alpha, beta = math.log(5 / 2 + 1, 2), math.sqrt(5 / 5)
        total = (1.0 * (1 + 1 / alpha) / beta * ce + 0.1 * alpha * beta * hkd + 0.2 * alpha * beta * tkd
                 + 0.001 * (ft_old + ft_new))
    for name, value in {"ce": ce, "hkd": hkd, "tkd": tkd, "ft_old": ft_old, "ft_new": ft_new, "loss": total}.items():
        assert torch.allclose(out[name], value, atol=1e-5), name
    assert hkd > 0 and tkd > 0  # the student differs from its teacher


def test_warmup_cosine_is_cosine_lr():
    steps, warmup = 100, 30
    for step in (0, 29, 30, 64, 99):
        expected = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - 30) / 70))
        assert warmup_cosine(step, warmup, steps) == pytest.approx(expected)


def test_token_statistics_and_kl_equal_the_reference_hooks():
    """`InputStatHook.update_stat` over batches + `merge_stats`, and `CustomBNInputHook` / `KLDivergence`
    on sequence-first tokens with `batch_dim=1`."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 5, 8) * 2 + 1, torch.randn(3, 5, 8)]
    ref_mean, ref_sq, cnt = 0, 0, 0
    for b in batches:
        lnd = b.transpose(0, 1)
        bs = lnd.shape[0]  # the reference's batch_size = inputs.shape[0]: the sequence length in LND
        ref_mean = cnt / (cnt + bs) * ref_mean + bs / (cnt + bs) * lnd.mean([1, 2])
        ref_sq = cnt / (cnt + bs) * ref_sq + bs / (cnt + bs) * (lnd**2).mean([1, 2])
        cnt += bs
    ours = Moments()
    for b in batches:
        ours.update(b)
    mean, var = ours.stats()
    # the reference weighs LND batches by their length L, not by images: equal weights here (L = 5 for both)
    assert torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(var, ref_sq - ref_mean**2, atol=1e-5)
    x = torch.randn(6, 5, 8)
    lnd = x.transpose(0, 1)
    m, v = lnd.mean([1, 2]), lnd.contiguous().view(5, -1).var(1, unbiased=False)
    hook = 0.5 * (torch.log(var) - torch.log(v + 1e-8) - (1 - (v + (m - mean) ** 2) / var)).mean()
    prior = 0.5 * (torch.log(var) - torch.log(v + 1e-8 + 1e-8) - (1 - (v + 1e-8 + (m - mean) ** 2) / var)).mean()
    assert torch.allclose(position_kl(x, mean, var, 0.0), hook, atol=1e-6)
    assert torch.allclose(position_kl(x, mean, var, 1e-8), prior, atol=1e-6)
    stats = TokenStatistics(merge_limit=2)
    first, second = Moments(), Moments()
    first.update(batches[0])
    second.update(batches[1])
    stats.update({("input", 1): first, ("input", 2): first})
    stats.update({("input", 1): second, ("input", 2): second})
    n0, n1 = 4, 3
    pooled = n0 / 7 * first.mean + n1 / 7 * second.mean
    assert torch.allclose(torch.as_tensor(stats.blocks[("input", 1)].mean), pooled)
    assert torch.equal(torch.as_tensor(stats.blocks[("input", 2)].mean), first.mean)  # block >= limit: first
    assert torch.allclose(torch.as_tensor(stats.model[("input", 2)].mean), pooled)  # full-phase stats: merged


def reference_inversion(x, target, model, hooks, alpha_rf, alpha_pr, prior, iters, lr_at, return_best,
                        size_change=(), grid=None, aug=None):
    """`LayerWiseCLIPInversion.inversion` (adam, boost off, mse, no grad clip, start_block > 0)."""
    inputs = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([inputs], lr=lr_at(0))
    best_loss, best = None, None
    for i in range(iters):
        if i in size_change:
            new_res = min(inputs.shape[2] * 2, grid)
            inputs = F.interpolate(inputs.detach(), size=(new_res, new_res), mode="bicubic").requires_grad_(True)
            opt = torch.optim.Adam([inputs], lr=lr_at(i))
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad()
        out = model(aug(inputs) if aug else inputs)
        l_stat = hooks.kl() if len(hooks) else torch.tensor(0.0)
        l_blur = total_variation_4(inputs) if aug else torch.tensor(0.0)
        l_mse = F.mse_loss(out, target)
        l_in = prior(inputs) if prior else None
        loss = l_mse + alpha_rf * l_stat + alpha_pr * l_blur + (alpha_rf * l_in if prior else 0)
        loss.backward()
        opt.step()
        cmp = l_mse.item() + alpha_rf * l_stat.item() + alpha_pr * l_blur.item() + (alpha_rf * l_in.item() if prior
                                                                                       else 0)
        if best_loss is None or best_loss > cmp:
            best_loss, best = cmp, inputs.detach().clone()
    return best if return_best else inputs.detach()


@pytest.fixture(scope="module")
def observed_engine():
    torch.manual_seed(0)
    net = IncrementalClassifier(MoEClipBackbone("clip_tiny", in_channels=1)).eval()
    engine = PerLayerInversion(statistics="data", start_block=1, layer_steps=4, start_steps=5, start_upsample=[2],
                               start_image_size=16, full_steps=4, lr=0.05, layer_lr=0.1, start_lr=0.1,
                               bn_weight=0.002, layer_bn_factor=1.0, input_tv_weight=0.005, boost=False,
                               keep_best=False, full_schedule="cosine", cosine_period=10, per_class=2, boost_rate=2,
                               select_step=1, contrastive_epochs=2, refit_old=False, progress=False)
    engine.setup((1, 8, 8), (torch.zeros(1), torch.ones(1)))
    batches = [(torch.randn(8, 1, 8, 8), torch.arange(8) % 2) for _ in range(2)]
    engine.observe(net, batches, None, None)
    return engine, net


def test_block_and_start_block_loops_equal_the_reference(observed_engine):
    engine, net = observed_engine
    blocks = net.backbone.blocks()
    weight = 0.002 * len(blocks) * 1.0
    stats = lambda k: engine.token_stats.blocks[("input", k)].stats()  # noqa: E731
    target = torch.randn(3, 17, 64)
    start, prior = engine.token_block_start(2, 3, torch.Size([17, 64]), torch.device("cpu"))
    names = ("attn", "mlp")
    modules = [getattr(blocks[2].block, n) for n in names]
    hook_stats = [engine.token_stats.blocks[(n, 2)].stats() for n in names]
    torch.manual_seed(5)
    with StatisticHooks(modules, hook_stats) as hooks:
        expected = reference_inversion(start, target, blocks[2], hooks, weight, 0.0, prior, 4, lambda _: 0.1, True)
    from cl_inversion.inversion.common import SynthesisProgress, SynthesisStats
    engine.stats = SynthesisStats()
    progress = SynthesisProgress(100, "t", engine.stats, 10, False)
    with StatisticHooks(modules, hook_stats) as hooks:
        ours, _, _ = engine.optimise(start, target, blocks[2], hooks, prior, 4, lambda _: 0.1, weight, weight, 1.0,
                                     progress, {}, keep_best=True)
    assert torch.allclose(ours, expected, atol=1e-5)
    # the start block: 2x2 patch grid of a 16-px image, doubled at step 2, resized to the 4x4 grid for the block
    u_target = torch.randn(3, 17, 64)
    mean, var = stats(1)
    u0 = torch.randn(3, 64, 2, 2) * var.sqrt().view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    prior1 = lambda u: position_kl(u, mean, var, 1e-8)  # noqa: E731
    aug = lambda u: F.interpolate(u, size=(4, 4), mode="bicubic")  # noqa: E731
    expected = reference_inversion(u0, u_target, lambda u: blocks[1](u), StatisticHooks([], []), weight, 0.0, prior1,
                                   5, lambda _: 0.1, False, size_change=[2], grid=4,
                                   aug=lambda u: aug(u))
    ours, _, _ = engine.optimise(u0, u_target, lambda u: blocks[1](aug(u)), StatisticHooks([], []), prior1, 5,
                                 lambda _: 0.1, weight, weight, 1.0, progress, {}, keep_best=False, upsample_at=[2],
                                 upsample_cap=4)
    assert ours.shape == (3, 64, 4, 4) and torch.allclose(ours, expected, atol=1e-5)


def test_full_phase_equals_the_reference_loop(observed_engine):
    """Second half of `layer_wise_inversion_for_cl`: Sequential(blocks[1:]) on the resized input, KL of every
    residual block's input, TV of the input, CosineAnnealingLR(T_max) stepped every step, last iterate."""
    engine, net = observed_engine
    blocks = net.backbone.blocks()
    u, target = torch.randn(3, 64, 4, 4), torch.randn(3, 32)
    residual = [2, 3]
    stats = [engine.token_stats.model[("input", k)].stats() for k in residual]
    aug = lambda x: F.interpolate(x, size=(4, 4), mode="bicubic")  # noqa: E731

    def tail(x):
        for b in blocks[1:]:
            x = b(x)
        return x

    with StatisticHooks([blocks[k] for k in residual], stats) as hooks:
        expected = reference_inversion(u, target, tail, hooks, 0.002, 0.005, None, 4,
                                       lambda i: 0.05 * (1 + math.cos(math.pi * i / 10)) / 2, False, aug=aug)
    ours = engine.invert_token_full(net, u, target, 0.05)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_synthesis_makes_per_class_block_inputs(observed_engine):
    engine, net = observed_engine
    pool, labels = engine.synthesize(net, [0, 1], n=999)
    assert pool.shape == (4, 64, 4, 4) and sorted(labels.tolist()) == [0, 0, 1, 1]
    assert torch.isfinite(pool).all() and len(engine.block_losses) == 4  # blocks 4..1 of [patch, tokens, 2 res, pool]
    assert engine.pool_features(net, pool).shape == (4, 32)


def test_pmi_clip_preset_runs_end_to_end_on_the_tiny_model(tmp_path):
    res = run_in_process("experiment=pmi_clip_cifar100_10t", "+smoke=digits", "backbone=moe_clip_tiny", "trainer=cpu",
                         "logger=none", "checkpoint=false", run_dir=tmp_path)
    assert res["status"] == "completed" and len(res["accuracy_matrix"]) == 2
    record = res["inversion"][0]
    assert record["n_images"] == 2 * 5 and 0 <= record["teacher_accuracy"] <= 100


def test_pmi_clip_preset_carries_the_reference_config(compose):
    """`configs/moe_adapter/cf100.yaml` and the learner's fixed arguments."""
    cfg = compose(["experiment=pmi_clip_cifar100_10t"])
    assert cfg.backbone.model_name == "ViT-B-16" and cfg.backbone.pretrained == "openai"
    assert cfg.scenario.n_tasks == 10 and cfg.dataset.batch_size == 64 and cfg.trainer.max_epochs == 3
    m, e = cfg.method, cfg.inversion.vit_per_layer
    assert (m.lr, m.weight_decay, m.template, m.start_block) == (0.001, 0.0, "a bad photo of a {}.", 1)
    assert (m.hkd_scale, m.tkd_scale, m.ft_scale, m.ce_scale, m.change_factor) == (0.1, 0.2, 0.001, 1.0, True)
    assert (e.layer_steps, e.layer_lr, e.start_steps, list(e.start_upsample), e.full_steps, e.lr) == (
        200, 0.1, 1200, [300, 600, 900], 600, 0.01)
    assert (e.bn_weight, e.layer_bn_factor, e.input_tv_weight, e.layer_batch, e.batch_size) == (
        0.002, 1.0, 0.005, 40, 20)
    assert (e.per_class, e.boost_rate, e.select_step, e.keep_rate) == (5, 20, 5, 0.5)
    assert not e.boost and not e.keep_best


def reference_rotate_features(pro_a, pro_b, x):
    """`rotate_features` of `moe_adapter_open_world.py`, verbatim (numpy)."""
    import numpy as np

    cos_t = np.dot(pro_a, pro_b)
    theta = np.arccos(cos_t)
    if np.isclose(theta, 0):
        return x.copy()
    v = pro_b - cos_t * pro_a
    v /= np.linalg.norm(v)
    xa, xv = np.dot(pro_a, x), np.dot(v, x)
    x_plane_rot = (cos_t * xa - np.sin(theta) * xv) * pro_a + (np.sin(theta) * xa + cos_t * xv) * v
    x_ortho = x - xa * pro_a - xv * v
    return x_plane_rot + x_ortho


def reference_prototype_mapping(raw_text_feats, new_texts, raw_cls2stat, per_class, proto_class, shift_factor):
    """`Learner.prototype_mapping` (proto_map, txt_txt, open_feat_type rand, proto_shift 0), its loops as written."""
    import numpy as np

    raw_image_feats = {}
    for lab, text_feat in enumerate(new_texts):
        text_feat = text_feat[None]
        cos_sim = torch.sum(raw_text_feats * text_feat, dim=1).numpy()
        sim_order = np.flip(np.argsort(cos_sim))
        all_lab_feats = []
        for prv_ci in range(proto_class):
            cand_ci = int(sim_order[prv_ci])
            cls_mean, cls_std = raw_cls2stat[cand_ci]
            eps = torch.randn(size=[per_class, cls_mean.shape[1]], dtype=torch.float32)
            cls_feats = F.normalize(eps * cls_std + cls_mean, dim=-1).numpy()
            old_proto, new_proto = raw_text_feats[cand_ci, :].numpy(), np.squeeze(text_feat.numpy())
            all_lab_feats.append(np.stack([reference_rotate_features(old_proto, new_proto, cls_feats[j])
                                           for j in range(per_class)]))
        sub = np.mean(np.stack(all_lab_feats), axis=0)
        sub = sub / np.linalg.norm(sub, ord=2, axis=-1, keepdims=True)
        aug = [(1.0 - shift_factor) * sub[ti] + shift_factor * np.squeeze(text_feat.numpy()) for ti in range(per_class)]
        raw_image_feats[lab] = np.stack([a / np.linalg.norm(a, 2) for a in aug])
    return raw_image_feats


def test_open_set_projection_equals_the_reference_prototype_mapping():
    from cl_inversion.inversion.features import ClassGaussians
    from cl_inversion.inversion.openset import project_open_set, rotate_features

    torch.manual_seed(0)
    d, n_old = 16, 7
    old_text, new_text = F.normalize(torch.randn(n_old, d), dim=-1), F.normalize(torch.randn(3, d), dim=-1)
    feats, labels = torch.randn(70, d) * 2 + 1, torch.arange(n_old).repeat_interleave(10)
    gaussians = ClassGaussians()
    gaussians.fit(feats, labels)
    stats = {c: (gaussians.mean[c][None], gaussians.std[c][None]) for c in range(n_old)}
    # np.std per class (the code's get_class_wise_distribution)
    assert torch.allclose(stats[2][1][0], torch.from_numpy(feats[labels == 2].numpy().std(0)), atol=1e-5)
    torch.manual_seed(1)
    ours, local = project_open_set(old_text, new_text, gaussians, per_class=4, top_k=3, shift=0.1)
    torch.manual_seed(1)
    ref = reference_prototype_mapping(old_text, new_text, stats, per_class=4, proto_class=3, shift_factor=0.1)
    assert local.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.allclose(ours, torch.from_numpy(np.concatenate([ref[j] for j in range(3)])).float(), atol=1e-5)
    x = torch.randn(5, d)
    assert torch.allclose(rotate_features(old_text[0], old_text[0], x), x)  # no angle: unchanged
    rotated = rotate_features(old_text[0], new_text[0], old_text[:1])
    assert torch.allclose(rotated[0], new_text[0], atol=1e-5)  # a maps onto b
    assert torch.allclose(rotate_features(old_text[0], new_text[0], x).norm(dim=1), x.norm(dim=1), atol=1e-5)


def test_pmi_clip_openset_preset_learns_the_last_task_without_its_data(tmp_path):
    res = run_in_process("experiment=pmi_clip_openset_cifar100", "+smoke=digits", "backbone=moe_clip_tiny",
                         "trainer=cpu", "logger=none", "checkpoint=false",
                         "inversion.vit_per_layer.open_set.per_class=3", run_dir=tmp_path)
    assert res["status"] == "completed" and len(res["accuracy_matrix"]) == 2
    boundary, open_set = res["inversion"]
    assert "open_set" not in boundary and open_set["open_set"] and open_set["task"] == 1
    assert open_set["n_images"] == 5 * 3  # per_class targets for each of the last task's 5 classes


def test_pmi_clip_openset_preset_carries_the_reference_config(compose):
    """`configs/moe_openset/cf100.yaml`: the open-set keys, and tune_lr 0.1."""
    cfg = compose(["experiment=pmi_clip_openset_cifar100"])
    assert cfg.backbone.model_name == "ViT-B-16" and cfg.backbone.pretrained == "openai" and cfg.seed == 1993
    assert cfg.scenario.n_tasks == 10 and cfg.inversion.vit_per_layer.lr == 0.1
    o, e = cfg.method.open_set, cfg.inversion.vit_per_layer.open_set
    assert (o.lr, o.epochs, o.ce_scale, o.hkd_scale, o.tkd_scale, o.ft_scale) == (0.0005, 1, 1.0, 0.0, 0.0, 0.001)
    assert (e.per_class, e.top_k, e.shift, e.bn_weight, e.input_tv_weight) == (20, 5, 0.1, 0.02, 0.0)


OPEN_SET = {"lr": 0.01, "epochs": 2, "repeat": 10, "warmup_steps": 4, "ce_scale": 1.0, "hkd_scale": 0.1,
            "tkd_scale": 0.2, "ft_scale": 0.5}  # every term weighted, so that each one shows


def encode_text(model, prompts, tok):
    """`encode_text(tokenizer(prompts), normalize=True)`."""
    return F.normalize(model.encode_text(tok(prompts)), dim=-1)


def reference_open_set_terms(m, inputs, targets, mem_sp, mem_lab, o):
    """One step of `openset_training` (start_block 1, prv_ft 0, ft_balance 0, label_smoothing 0): its terms
    and its summed loss (the code backpropagates each term, scaled, into the same gradients)."""
    model, prv, tok, texts, n_old = m.net.head.text, m.previous, m.net.head.tokenizer.fn, m.net.head.prompts, m.n_old
    n_total = len(texts)
    alpha = math.log((n_total - n_old) / 2 + 1, 2)
    beta = math.sqrt(n_old / (n_total - n_old))
    ce_factor, hkd_factor = o["ce_scale"] * (1 + 1 / alpha) / beta, o["hkd_scale"] * alpha * beta
    tkd_factor, ft_factor = o["tkd_scale"] * alpha * beta, o["ft_scale"]
    cur_fi = reference_visual_from_block_1(m.net.backbone.visual, inputs)
    cur_ft = encode_text(model, texts[n_old:], tok)
    logit_scale = model.logit_scale.exp()
    loss_ce = F.cross_entropy(logit_scale * cur_fi @ cur_ft.t(), targets.long() - n_old)
    old_ft = encode_text(model, texts[:n_old], tok)
    old_fi = reference_visual_from_block_1(m.net.backbone.visual, mem_sp)
    teacher_fi = reference_visual_from_block_1(prv.backbone.visual, mem_sp).detach()
    loss_hkd = F.l1_loss(logit_scale * old_fi @ old_ft.t(), logit_scale * teacher_fi @ old_ft.t())
    student_ft = encode_text(model, texts[:n_old], tok)
    teacher_ft = encode_text(prv.head.text, texts[:n_old], tok).detach()
    loss_tkd = F.l1_loss(student_ft, teacher_ft)
    ft_old_fi = reference_visual_from_block_1(m.net.backbone.visual, mem_sp).detach()
    all_ft = encode_text(model, texts, tok)
    loss_ft_old = F.cross_entropy(logit_scale * ft_old_fi @ all_ft.t(), mem_lab)
    ft_new_fi = reference_visual_from_block_1(m.net.backbone.visual, inputs).detach()
    loss_ft_new = F.cross_entropy(logit_scale * ft_new_fi @ encode_text(model, texts, tok).t(), targets)
    total = (ce_factor * loss_ce + hkd_factor * loss_hkd + tkd_factor * loss_tkd
             + ft_factor * loss_ft_old + ft_factor * loss_ft_new)
    return {"ce": loss_ce, "hkd": loss_hkd, "tkd": loss_tkd, "ft_old": loss_ft_old, "ft_new": loss_ft_new,
            "loss": total}


class ReferenceBuffer:
    """`SimpleReplayDataset.get_batch` without transforms: `size` entries drawn with `np.random.randint`."""

    def __init__(self, samples, labels):
        self.mem_sps, self.mem_labs = samples, labels

    def sample(self, size):
        rand_ids = np.random.randint(low=0, high=len(self.mem_sps), size=[size])
        return (torch.stack([self.mem_sps[int(i)] for i in rand_ids]),
                torch.tensor([int(self.mem_labs[int(i)]) for i in rand_ids], dtype=torch.long))


class RandomDataset(torch.utils.data.Dataset):
    """The code's `RandomDataset` (transforms None): the samples ten times over."""

    def __init__(self, samples, labels):
        self.samples, self.labels = samples, labels

    def __len__(self):
        return len(self.samples) * 10

    def __getitem__(self, index):
        idx = index % len(self.samples)
        return self.samples[idx], int(self.labels[idx])


def reference_cosine_lr(optimizer, base_lr, warmup_length, steps, step):
    """MoE-Adapters4CL `cosine_lr`'s adjuster at `step` (`_warmup_lr`, then the cosine)."""
    if step < warmup_length:
        lr = base_lr * (step + 1) / warmup_length
    else:
        lr = 0.5 * (1 + np.cos(np.pi * (step - warmup_length) / (steps - warmup_length))) * base_lr
    for group in optimizer.param_groups:
        group["lr"] = lr


def reference_openset_training(m, pool, labels, batch_size, o):
    """`openset_training`'s loop: AdamW over the experts, `cosine_lr(open_lr, 30→warmup, 3 · len(loader))` at each
    iteration (counted across epochs), a shuffled `DataLoader(RandomDataset, batch_size, drop_last=False)`, and
    the network in eval mode (the epoch's `eval_task` before its steps: no dropout)."""
    params = [p for k, p in m.net.named_parameters() if is_expert_parameter(k)]
    optimizer = torch.optim.AdamW(params, lr=o["lr"], weight_decay=0.0)
    train_loader = torch.utils.data.DataLoader(RandomDataset(list(pool), labels.numpy()), batch_size=batch_size,
                                               shuffle=True, drop_last=False)
    m.net.eval()
    for epoch in range(o["epochs"]):
        for iteration, (inputs, targets) in enumerate(train_loader, start=len(train_loader) * epoch):
            reference_cosine_lr(optimizer, o["lr"], o["warmup_steps"], 3 * len(train_loader), iteration)
            mem_sp, mem_lab = m.replay.sample(inputs.shape[0])
            optimizer.zero_grad()
            reference_open_set_terms(m, inputs, targets, mem_sp, mem_lab, o)["loss"].backward()
            optimizer.step()


def open_set_pair():
    """Two equal learners at the second task with the open-set options, router noise off, the same replay."""
    pair = [method_at_second_task(router_noise=False, open_set=OPEN_SET) for _ in range(2)]
    torch.manual_seed(2)
    u, uy = torch.randn(9, 64, 4, 4), torch.arange(9) % 5
    for m in pair:
        m.receive_replay(ReferenceBuffer(u, uy))
    return pair


def test_open_set_loss_equals_the_reference_step():
    """`openset_training`'s terms and weights (change_factor on CE, HKD, TKD; FT as given) on identical tensors."""
    m, _ = open_set_pair()
    m.net.eval()
    pool, y = torch.randn(6, 64, 4, 4), torch.arange(6) % 5 + 5
    np.random.seed(3)
    ours = m.open_set_loss(pool, y)
    np.random.seed(3)
    mem_sp, mem_lab = m.replay.sample(len(y))
    with torch.no_grad():
        ref = reference_open_set_terms(m, pool, y, mem_sp, mem_lab, OPEN_SET)
    for name, value in ref.items():
        assert torch.allclose(ours[name], value, atol=1e-5), name
    assert all(ref[k] > 0 for k in ("hkd", "tkd", "ft_old", "ft_new"))


def test_train_open_set_equals_the_reference_loop():
    """`train_open_set` against `openset_training`'s loop written out, same seeds: the same batches (the code's
    shuffled loader over the pool ×10), replay draws, warm-up cosine and AdamW steps give the same experts; with
    the adapters' dropout on, as the code trains (its network left in eval mode), they would not."""
    ours, ref = open_set_pair()
    before = {k: p.clone() for k, p in ours.net.named_parameters() if is_expert_parameter(k)}
    torch.manual_seed(4)
    pool, labels = torch.randn(7, 64, 4, 4), torch.arange(7) % 5 + 5
    for train in (lambda: ours.train_open_set(pool, labels),
                  lambda: reference_openset_training(ref, pool, labels, ref.open_batch_size, OPEN_SET)):
        torch.manual_seed(5)
        np.random.seed(5)
        train()
    trained = dict(ref.net.named_parameters())
    for name, p in ours.net.named_parameters():
        if is_expert_parameter(name):
            assert torch.allclose(p, trained[name], atol=1e-4), name  # Adam on float32 sums in another order
    assert any(not torch.allclose(p, before[k]) for k, p in ours.net.named_parameters() if k in before)


def test_open_set_mode_keeps_router_noise_and_drops_dropout():
    m = method_at_second_task()
    m.open_set_mode()
    block = m.net.backbone.visual.transformer.resblocks[0]
    x = torch.randn(3, 17, 64)
    torch.manual_seed(0)
    assert not torch.equal(block.gates(x[:, 0]), block.gates(x[:, 0]))  # noisy gates, as `set_is_train(True)`
    adapter = block.adapters[0]
    assert not adapter.training and torch.equal(adapter(x), adapter(x))  # no dropout, as after `eval_task`
