"""R-DFCIL's relation-guided student: term weights, RKD, the loss on a tiny batch."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import student_at_second_task

from cl_inversion.data import ClassIncrementalScenario, digits
from cl_inversion.inversion.replay import BufferReplay
from cl_inversion.methods import RDFCIL
from cl_inversion.methods.relation import angle_relations, rkd_angle
from cl_inversion.models import IncrementalClassifier, SmallCNN


def make(cls):
    torch.manual_seed(0)
    return cls(IncrementalClassifier(SmallCNN(1, width=8)), optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def test_angle_relations_by_hand():
    # three points of a right isoceles triangle: the angle at the right-angle vertex has cosine 0
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    angles = angle_relations(e).view(3, 3, 3)
    assert angles[0, 1, 2].item() == pytest.approx(0.0, abs=1e-6)  # at vertex 0, towards 1 and 2
    assert angles[1, 0, 2].item() == pytest.approx(math.cos(math.pi / 4), abs=1e-6)
    assert rkd_angle(e, e * 3 + 1).item() == pytest.approx(0.0, abs=1e-6)  # relations ignore scale/shift
    assert rkd_angle(e, e.flip(1) * torch.tensor([1.0, 2.0])) > 0


def test_term_weights_follow_rdfcil():
    m = make(RDFCIL)
    m.task_sizes = [4, 2]
    alpha, beta = math.log2(2 / 2 + 1), math.sqrt(4 / 2)
    w = m.term_weights()
    assert w["ce"] == pytest.approx(0.5 * (1 + 1 / alpha) / beta)
    assert w["hkd"] == pytest.approx(0.15 * alpha * beta)
    assert w["rkd"] == pytest.approx(0.5 * alpha * beta)


def test_loss_adds_local_ce_hkd_and_rkd_and_projection_is_trained():
    sc = ClassIncrementalScenario(digits(), n_tasks=5)
    m = make(RDFCIL)
    m.begin_task(0, 2, sc.datamodule(0, 8))
    m.end_task(sc.datamodule(0, 8))
    m.begin_task(1, 2, sc.datamodule(1, 8))
    torch.manual_seed(1)
    m.receive_replay(BufferReplay(torch.randn(16, 1, 8, 8), torch.tensor([0, 1] * 8)))
    with torch.no_grad():
        m.net.backbone.stem[0].weight.add_(0.05)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([2, 3] * 3)
    torch.manual_seed(2)
    terms = m.loss(x, y)
    torch.manual_seed(2)
    replay_x, _ = m.replay.sample(6)
    # real and synthetic go through the network in separate passes (BN statistics never mix them)
    local = F.cross_entropy(m.net(x)[:, 2:4], y - 2)
    hkd = (m.net(replay_x)[:, :2] - m.previous(replay_x)).abs().mean()
    w = m.term_weights()
    assert torch.allclose(terms["local_ce"], local, atol=1e-5)
    assert torch.allclose(terms["hkd"], hkd, atol=1e-5)
    assert torch.allclose(terms["loss"], w["ce"] * local + w["hkd"] * hkd + w["rkd"] * terms["rkd"], atol=1e-5)
    assert any(p is m.projection.student.weight for p in m.trainable_parameters())
    assert any(p is m.projection.teacher.weight for p in m.trainable_parameters())


@pytest.mark.parametrize("scope", ["head", "all"])
def test_balancing_phase_is_balanced_softmax_plus_hkd_and_scope_decides_what_learns(scope):
    m = student_at_second_task(RDFCIL, finetune_loss="balanced_softmax", finetune_scope=scope, finetune_ce_scale=1.0)
    assert (m.n_old, m.n_seen) == (4, 6)  # the prior tilts old logits by -log 4, new ones by -log 2
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([4, 5] * 3)
    replay_x, replay_y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    m.net.eval()  # BN statistics fixed so that the check below sees the same logits
    terms = m.balancing_loss(x, y, replay_x, replay_y)
    logits = m.net(torch.cat([x, replay_x]))[:, :6]
    prior = torch.tensor([-math.log(4)] * 4 + [-math.log(2)] * 2)
    expected_ce = F.cross_entropy(logits + prior, torch.cat([y, replay_y]))
    expected_hkd = (logits[6:, :4] - m.previous(replay_x)).abs().mean()
    assert torch.allclose(terms["balanced_ce"], expected_ce, atol=1e-5)
    assert torch.allclose(terms["hkd"], expected_hkd, atol=1e-5)
    assert torch.allclose(terms["loss"], expected_ce + m.term_weights()["hkd"] * expected_hkd, atol=1e-5)
    m.net.zero_grad()
    terms["loss"].backward()
    backbone_grad = m.net.backbone.stem[0].weight.grad
    assert all(s.weight.grad.abs().sum() > 0 for s in m.net.head.slices)
    if scope == "head":  # R-DFCIL: frozen features
        assert backbone_grad is None or backbone_grad.abs().sum() == 0
    else:
        assert backbone_grad.abs().sum() > 0


def test_balanced_softmax_prior_follows_the_replay_ratio():
    """Ren et al. 2020: logits + log of each class's share of the batch; 6 real (2 new classes), 12 synthetic
    (4 old): an old class holds 3/18 of the batch, a new one 3/18 as well."""
    m = student_at_second_task(RDFCIL, finetune_loss="balanced_softmax", finetune_ce_scale=1.0, replay_ratio=2.0)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([4, 5] * 3)
    replay_x, replay_y = torch.randn(12, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 3)
    m.net.eval()
    terms = m.balancing_loss(x, y, replay_x, replay_y)
    logits = m.net(torch.cat([x, replay_x]))[:, :6]
    prior = torch.tensor([math.log((12 / 18) / 4)] * 4 + [math.log((6 / 18) / 2)] * 2)
    expected = F.cross_entropy(logits + prior, torch.cat([y, replay_y]))
    assert torch.allclose(terms["balanced_ce"], expected, atol=1e-5)


def test_unknown_balancing_settings_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="method.finetune_loss='focal'.*weighted, balanced_softmax"):
        make_with(finetune_loss="focal")
    with pytest.raises(ValueError, match="method.finetune_scope='neck'.*head, all"):
        make_with(finetune_scope="neck")


def make_with(**kwargs):
    return RDFCIL(IncrementalClassifier(SmallCNN(1, width=8)), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
               **kwargs)


def test_the_digits_tuning_is_a_preset_and_method_rdfcil_is_the_published_student(compose):
    digits = compose(["experiment=rdfcil_digits"])  # conf/experiment/rdfcil_digits.yaml
    assert (digits.method.finetune_scope, digits.method.finetune_loss) == ("all", "balanced_softmax")
    assert digits.method.rkd_scale == 5.0 and digits.profile == "digits_cpu"
    for overrides in (["method=rdfcil"], ["method=rdfcil", "dataset=imagefolder"],
                      ["experiment=rdfcil_cifar100_10t"], ["experiment=rdfcil_cifar100_10t", "+smoke=digits"]):
        cfg = compose(overrides)
        assert (cfg.method.finetune_scope, cfg.method.finetune_loss, cfg.method.rkd_scale) == ("head", "weighted", 0.5)
        assert cfg.method.finetune_hkd is True  # R-DFCIL's code keeps HKD
