"""Each baseline's loss on a tiny batch, against a hand computation."""

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cl_inversion.data import ClassIncrementalScenario, digits
from cl_inversion.methods import EWC, L2, Finetune, Joint, LwF
from cl_inversion.models import IncrementalClassifier, SmallCNN

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(IncrementalClassifier(SmallCNN(1, width=8)), optimizer=SGD, **kwargs)


@pytest.fixture(scope="module")
def scenario():
    return ClassIncrementalScenario(digits(), n_tasks=5)


def two_tasks(method, scenario):
    dm0 = scenario.datamodule(0, 16)
    method.begin_task(0, 2, dm0)
    method.end_task(dm0)
    dm1 = scenario.datamodule(1, 16)
    method.begin_task(1, 2, dm1)
    return dm1


def batch(n=6, labels=(2, 3)):
    torch.manual_seed(1)
    return torch.randn(n, 1, 8, 8), torch.tensor([labels[i % 2] for i in range(n)])


def test_finetune_and_joint_are_cross_entropy_over_seen_classes(scenario):
    for cls in (Finetune, Joint):
        m = make(cls)
        two_tasks(m, scenario)
        x, y = batch()
        assert m.n_seen == 4 and m.n_old == 2
        assert torch.allclose(m.loss(x, y), F.cross_entropy(m.net(x), y))
    assert Joint.uses_all_data and not Finetune.uses_all_data


def test_lwf_adds_unnormalised_distillation_of_old_logits(scenario):
    m = make(LwF, temperature=2.0, weight=1.0)
    two_tasks(m, scenario)
    x, y = batch()
    # perturb the current net so it differs from the frozen previous one
    with torch.no_grad():
        m.net.backbone.stem[0].weight.add_(0.1)
    terms = m.loss(x, y)
    logits, old = m.net(x), m.previous(x)
    kd = -(F.softmax(old / 2, 1) * F.log_softmax(logits[:, :2] / 2, 1)).sum(1).mean()  # ABD: no T²
    assert torch.allclose(terms["kd"], kd)
    assert torch.allclose(terms["loss"], F.cross_entropy(logits, y) + kd)
    assert not any(p.requires_grad for p in m.previous.parameters())


def test_l2_penalty_is_squared_distance_to_previous_weights(scenario):
    m = make(L2, reg_coef=0.5)
    two_tasks(m, scenario)
    assert m.penalty().item() == 0.0
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.01)
    anchored = m.slots[0]["anchor"]  # every parameter that existed at the task's end: backbone and head
    assert any(n.startswith("head.") for n in anchored) and "head.slices.1.weight" not in anchored
    n = sum(t.numel() for t in anchored.values())
    assert m.penalty().item() == pytest.approx(n * 1e-4, rel=1e-3)
    x, y = batch()
    terms = m.loss(x, y)
    assert torch.allclose(terms["loss"], terms["ce"] + 0.5 * terms["reg"])


def test_ewc_fisher_is_nonnegative_one_slot_per_task_and_weights_the_penalty(scenario):
    m = make(EWC, reg_coef=10.0)
    two_tasks(m, scenario)
    first = {n: f.clone() for n, f in m.slots[0]["importance"].items()}
    assert all((f >= 0).all() for f in first.values())
    assert sum(f.sum() for f in first.values()) > 0
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.01)
    expected = sum((f * 1e-4).sum() for f in first.values())
    assert m.penalty().item() == pytest.approx(expected.item(), rel=1e-3)
    m.end_task(scenario.datamodule(1, 16))  # second task: a second anchor and Fisher
    assert len(m.slots) == 2 and all(torch.equal(m.slots[0]["importance"][n], first[n]) for n in first)


def test_training_step_runs_inside_a_real_trainer(scenario):
    m = make(LwF)
    dm = two_tasks(m, scenario)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu")
    before = [p.detach().clone() for p in m.net.parameters()]
    trainer.fit(m, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.net.parameters()))
    assert "task_1/kd" in trainer.callback_metrics
