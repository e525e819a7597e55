"""PMI's class-wise feature model (`inversion/features.py`) against the reference's formulas written out by
hand here (RuilinTong/PMI-CFS-DFCL @ 2913603f, `ResNet-32/continual_runner/class_wise_contrastive_buffer.py`;
`NegativeContrastiveLoss` from pkrukowski1/REMIX-Model-Inversion-via-Laplace-Kernel @ d1f7f86,
`ResNet-32/backbone/vaes.py`). Tiny tensors, all on the CPU."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from cl_inversion.inversion.features import (
    ClassGaussians,
    ContrastiveEncoder,
    FeatureModel,
    contrastive_selection,
    negative_contrastive_loss,
    selection_scores,
    train_contrastive_encoder,
)


def close(actual, expected, rtol=1e-6, atol=1e-6):
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def labelled_features(seed=0, per_class=(12, 9, 7), dim=5):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(k, dim, generator=g) * (0.5 + c) + 2.0 * c + 1.0 for c, k in enumerate(per_class)]
    labels = [torch.full((k,), c) for c, k in enumerate(per_class)]
    return torch.cat(feats), torch.cat(labels)


def trained_encoder(dim=5, seed=1, epochs=3):
    feats, _ = labelled_features(seed, per_class=(20,), dim=dim)
    torch.manual_seed(seed)
    return train_contrastive_encoder(feats, epochs=epochs, batch_size=8)


# ---- class statistics ----------------------------------------------------------------------------------

def test_gaussians_are_per_class_mean_and_biased_std_and_refit_keeps_other_classes():
    feats, labels = labelled_features()
    g = ClassGaussians()
    g.fit(feats, labels)
    x, y = feats.numpy(), labels.numpy()
    for c in range(3):
        assert g.mean[c].dtype == torch.float32 and g.mean[c].shape == (5,)
        close(g.mean[c], np.mean(x[y == c], axis=0))
        close(g.std[c], np.std(x[y == c], axis=0))  # numpy's default: biased, no epsilon

    old0 = g.mean[0].clone()
    g.fit(feats[labels == 1] * 2, labels[labels == 1])
    assert torch.equal(g.mean[0], old0)
    close(g.std[1], np.std(2 * x[y == 1], axis=0))

    torch.manual_seed(4)
    drawn = g.sample(2, 6)
    torch.manual_seed(4)
    close(drawn, torch.randn(6, 5) * g.std[2] + g.mean[2], rtol=0, atol=0)

    h = ClassGaussians()
    h.load_state_dict(g.state_dict())
    assert all(torch.equal(h.mean[c], g.mean[c]) and torch.equal(h.std[c], g.std[c]) for c in range(3))


# ---- encoder and losses --------------------------------------------------------------------------------

def encoder_by_hand(encoder, x, activation):
    """SimpleMLPEncoder.forward in eval mode, float64: (Linear, BN with running statistics, activation)
    per block, then y / (||y|| + 1e-6)."""
    y = x.double().numpy()
    mods = list(encoder.layers)
    for lin, bn in zip(mods[0::3], mods[1::3]):
        y = y @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        y = (y - rm) / np.sqrt(rv + bn.eps) * bn.weight.detach().double().numpy() + bn.bias.detach().double().numpy()
        y = np.where(y > 0, y, 0.01 * y) if activation == "leaky" else np.maximum(y, 0)
    return y / (np.sqrt((y ** 2).sum(1, keepdims=True)) + 1e-6)


@pytest.mark.parametrize("activation", ["leaky", "relu"])
def test_encoder_forward_matches_the_reference_blocks(activation):
    torch.manual_seed(0)
    enc = ContrastiveEncoder(6, blocks=2, activation=activation)
    assert [type(m) for m in enc.layers] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU if activation == "leaky"
                                             else nn.ReLU] * 2
    assert all(m.bias is not None for m in enc.layers[0::3])
    with torch.no_grad():  # non-trivial BN running statistics and affine parameters
        for _ in range(3):
            enc(torch.randn(16, 6) * 2 + 1)
        for bn in enc.layers[1::3]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    enc.eval()
    x = torch.randn(7, 6)
    out = enc(x)
    expected = encoder_by_hand(enc, x, activation)
    close(copy.deepcopy(enc).double()(x.double()), expected, rtol=1e-6, atol=1e-12)  # the formula, exactly
    close(out, expected, rtol=1e-5, atol=1e-5)  # float32 rounding
    close(out.norm(dim=1), np.ones(7), atol=1e-4)  # just under 1: the + 1e-6 in the denominator


def test_negative_contrastive_loss_is_the_reference_formula():
    z = torch.nn.functional.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    for tau in (1.0, 0.3):
        zz = z.double().numpy()
        n = len(zz)
        rows = [math.log(sum(math.exp(float(zz[i] @ zz[j]) / tau) for j in range(n)) / n) for i in range(n)]
        close(negative_contrastive_loss(z, tau), np.mean(rows))


def test_selection_scores_are_the_mean_similarity_to_the_selected():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    for tau in (1.0, 0.5):
        xx, yy = x.double().numpy(), y.double().numpy()
        expected = [np.mean([float(xx[i] @ yy[j]) / tau for j in range(3)]) for i in range(6)]
        close(selection_scores(x, y, tau), expected)


# ---- contrastive selection -----------------------------------------------------------------------------

def selection_by_hand(encoder, mean, std, samples, batch_size, slt_rate, tau, fixed_mean):
    """The reference's `contrastive_selection` loop (cur_feats=None), its `SelectContrastiveLoss` as a
    broadcast sum and `np.argsort`, then its compensation (or the fixed one; none if `fixed_mean` is None)."""
    steps = samples // batch_size + (samples % batch_size != 0)
    sup_batch = int(batch_size / slt_rate) if slt_rate > 0 else batch_size
    all_feats = None
    for _ in range(steps):
        rows = min(batch_size, samples) if all_feats is None else sup_batch
        feats = torch.randn(rows, len(mean)) * std + mean
        if all_feats is None:
            all_feats = feats
            continue
        with torch.no_grad():
            a, b = encoder(feats), encoder(all_feats)
            losses = (torch.sum(a[:, None, :] * b[None, :, :], dim=2) / tau).mean(1).numpy()
        slt = np.argsort(losses, kind="stable")[:min(batch_size, samples - all_feats.shape[0])]
        all_feats = torch.cat([all_feats, feats[slt]])
        if all_feats.shape[0] == samples:
            break
    if fixed_mean is None:
        return all_feats
    f_mean, f_std = all_feats.mean(0), torch.std(all_feats, dim=0)  # unbiased, as torch.std
    scale = std / (f_std + 1e-8)
    if fixed_mean:
        return (all_feats - f_mean) * scale + mean
    return (all_feats + (mean - f_mean)) * scale


@pytest.mark.parametrize("n,batch_size,keep_rate,tau", [(10, 3, 0.5, 1.0), (9, 2, 0.3, 0.5), (7, 2, 0.0, 1.0),
                                                        (4, 5, 0.5, 1.0)])
def test_contrastive_selection_reproduces_the_reference_step_by_step(n, batch_size, keep_rate, tau):
    enc = trained_encoder()
    mean = torch.linspace(2.0, 4.0, 5)
    std = torch.linspace(0.2, 0.6, 5)
    for rescale, fixed in (("reference", False), ("standardise", True)):
        torch.manual_seed(11)
        ours = contrastive_selection(enc, mean, std, n, batch_size, keep_rate=keep_rate, tau=tau, rescale=rescale)
        torch.manual_seed(11)
        ref = selection_by_hand(enc, mean, std, n, batch_size, keep_rate, tau, fixed)
        assert ours.shape == (n, 5)
        close(ours, ref)
        # the same global RNG draws were used: the next draw agrees too
        torch.manual_seed(11)
        contrastive_selection(enc, mean, std, n, batch_size, keep_rate=keep_rate, tau=tau, rescale=rescale)
        after_ours = torch.rand(1)
        torch.manual_seed(11)
        selection_by_hand(enc, mean, std, n, batch_size, keep_rate, tau, fixed)
        assert torch.equal(after_ours, torch.rand(1))


def test_reference_rescale_misses_the_class_mean_and_standardise_hits_mean_and_std():
    enc = trained_encoder()
    mean, std = torch.full((5,), 3.0), torch.linspace(0.2, 0.6, 5)
    torch.manual_seed(5)
    ref = contrastive_selection(enc, mean, std, 12, 3, rescale="reference")
    torch.manual_seed(5)
    fix = contrastive_selection(enc, mean, std, 12, 3, rescale="standardise")
    torch.manual_seed(5)
    chosen = selection_by_hand(enc, mean, std, 12, 3, 0.5, 1.0, fixed_mean=None)  # the set before compensation
    scale = std / (chosen.std(0) + 1e-8)
    close(ref.mean(0), mean * scale, rtol=1e-5)  # the reference's mean is the class mean times the scale
    assert not torch.allclose(ref.mean(0), mean, atol=1e-2)
    close(fix.mean(0), mean, rtol=1e-6, atol=1e-5)
    close(fix.std(0), std, rtol=1e-5)
    close(ref.std(0), std, rtol=1e-5)  # the scale is right; only the shift is off


def test_a_single_sample_skips_the_compensation():
    enc = trained_encoder()
    mean, std = torch.full((5,), 3.0), torch.full((5,), 0.5)
    torch.manual_seed(2)
    one = contrastive_selection(enc, mean, std, 1, 2)
    torch.manual_seed(2)
    close(one, torch.randn(1, 5) * std + mean, rtol=0, atol=0)
    assert contrastive_selection(enc, mean, std, 0, 2).shape == (0, 5)


# ---- encoder training ----------------------------------------------------------------------------------

def train_by_hand(feats, epochs, lr, tau, batch_size):
    """`train_contrastive_model` written out: modules built in SimpleMLPEncoder's order, Adam, a NaN loss
    ends the epoch, after each step a deep copy if the (pre-step) loss is the lowest so far. The loss is the
    module's own (checked against the formula above); shuffling is a global-RNG randperm per epoch."""
    d = feats.shape[1]
    net = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.LeakyReLU(),
                        nn.Linear(d, d), nn.BatchNorm1d(d), nn.LeakyReLU())
    initial = copy.deepcopy(net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    size = min(batch_size, len(feats))
    best_loss, best, losses = None, None, []
    for _ in range(epochs):
        order = torch.randperm(len(feats))
        for i in range(len(feats) // size):
            y = net(feats[order[i * size:(i + 1) * size]])
            z = y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + 1e-6)
            loss = negative_contrastive_loss(z, tau)
            if bool(torch.isnan(loss)):
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if best_loss is None or loss.item() < best_loss:
                best_loss, best = loss.item(), copy.deepcopy(net)
    return (net if best is None else best), initial, losses


def same_state(encoder, net):
    ours, theirs = list(encoder.layers.state_dict().values()), list(net.state_dict().values())
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        close(a.float(), b.float(), rtol=1e-6, atol=1e-7)


def test_training_returns_the_best_loss_copy_in_eval_mode():
    feats, _ = labelled_features(3, per_class=(11,), dim=4)
    torch.manual_seed(7)
    ours = train_contrastive_encoder(feats, lr=0.5, epochs=6, tau=0.5, batch_size=4)
    torch.manual_seed(7)
    best, _, losses = train_by_hand(feats, epochs=6, lr=0.5, tau=0.5, batch_size=4)
    assert len(losses) == 6 * 2  # 11 // 4 full batches per epoch, the rest dropped
    assert int(np.argmin(losses)) != len(losses) - 1  # so the best copy is not simply the last model
    assert not ours.training
    same_state(ours, best)


def test_training_on_nan_features_takes_no_step_and_returns_the_initial_encoder():
    feats = torch.randn(4, 3)
    feats[1, 2] = float("nan")
    torch.manual_seed(9)
    ours = train_contrastive_encoder(feats, epochs=3)
    torch.manual_seed(9)
    model, initial, losses = train_by_hand(feats, epochs=3, lr=1e-2, tau=1.0, batch_size=64)
    assert losses == [] and not ours.training
    same_state(ours, model)  # the NaN forward still reached the BN running statistics, as in the reference
    for a, b in zip(ours.parameters(), initial.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at least 2 features"):
        train_contrastive_encoder(feats[:1])


# ---- the feature model ---------------------------------------------------------------------------------

def fitted_model(**settings):
    feats, labels = labelled_features(per_class=(12, 9, 1))
    model = FeatureModel(epochs=2, **settings)
    torch.manual_seed(0)
    model.fit(feats, labels)
    return model


def test_sample_labels_counts_and_shuffle():
    model = fitted_model()
    assert sorted(model.encoders) == [0, 1]  # class 2 has a single feature: Gaussian only
    torch.manual_seed(1)
    feats, labels = model.sample(90, [0, 1, 2])
    assert feats.shape == (90, 5) and labels.shape == (90,) and labels.dtype == torch.long
    counts = torch.bincount(labels, minlength=3)
    assert counts.sum() == 90 and set(labels.tolist()) <= {0, 1, 2} and (counts > 0).all()
    runs = int((labels[1:] != labels[:-1]).sum()) + 1
    assert runs > 3  # not grouped by class
    close(feats[labels == 2], model.gaussians.mean[2].expand(int(counts[2]), 5), rtol=0, atol=0)  # std 0
    torch.manual_seed(1)
    _, only = model.sample(20, [1])
    assert (only == 1).all()


@pytest.mark.parametrize("selection,select_step", [("contrastive", 40), ("contrastive", 5), ("random", 40)])
def test_sample_is_generate_features(selection, select_step):
    model = fitted_model(selection=selection, select_step=select_step, rescale="standardise")
    if selection == "random":
        assert model.encoders == {}
    classes, n = [2, 0, 1], 70
    torch.manual_seed(3)
    feats, labels = model.sample(n, classes)

    torch.manual_seed(3)
    draws = torch.tensor(classes)[torch.randint(len(classes), (n,))].tolist()
    lab2cnt = {}
    for c in draws:
        lab2cnt[c] = lab2cnt.get(c, 0) + 1
    parts = []
    for c, k in lab2cnt.items():
        mean, std = model.gaussians.mean[c], model.gaussians.std[c]
        if selection == "contrastive" and c in model.encoders:
            parts.append(contrastive_selection(model.encoders[c], mean, std, k, max(k // select_step, 2),
                                               keep_rate=0.5, tau=1.0, rescale="standardise"))
        else:
            parts.append(torch.randn(k, 5) * std + mean)
    all_labs = torch.cat([torch.full((k,), c) for c, k in lab2cnt.items()])
    perm = torch.randperm(n)
    close(feats, torch.cat(parts)[perm], rtol=0, atol=0)
    assert torch.equal(labels, all_labs[perm])


def test_state_dict_round_trip_gives_identical_samples():
    model = fitted_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = FeatureModel(epochs=2)
    torch.manual_seed(8)
    restored.load_state_dict(torch.load(buffer))
    probe = torch.rand(1)
    torch.manual_seed(8)
    assert torch.equal(probe, torch.rand(1))  # loading draws nothing from the global RNG
    assert sorted(restored.encoders) == [0, 1] and not any(e.training for e in restored.encoders.values())
    assert restored.encoders[0].in_features == 5 and restored.encoders[0].blocks == 2
    torch.manual_seed(6)
    a = model.sample(50, [0, 1, 2])
    torch.manual_seed(6)
    b = restored.sample(50, [0, 1, 2])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("field,value,allowed", [("selection", "best", "contrastive, random"),
                                                 ("rescale", "fix", "reference, standardise"),
                                                 ("activation", "tanh", "leaky, relu")])
def test_bad_choices_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"inversion.per_layer.{field}='{value}': choose one of {allowed}") as err:
        FeatureModel(**{field: value})
    assert "\n" not in str(err.value)
    if field == "rescale":
        with pytest.raises(ValueError, match="inversion.per_layer.rescale='fix'"):
            contrastive_selection(nn.Identity(), torch.zeros(3), torch.ones(3), 4, 2, rescale="fix")


def test_sample_rejects_unknown_or_repeated_classes():
    model = fitted_model(selection="random")
    with pytest.raises(ValueError, match=r"no feature statistics for classes \[7\]"):
        model.sample(4, [0, 7])
    with pytest.raises(ValueError, match="distinct"):
        model.sample(4, [0, 0])
