"""EWC and L2 as GT-RIPL/Continual-Learning-Benchmark `agents/regularization.py`: the Fisher by hand on a
two-parameter model, one slot per task vs the online variant, all parameters, state round trip."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cl_inversion.methods import EWC, L2
from cl_inversion.models import IncrementalClassifier

SGD = functools.partial(torch.optim.SGD, lr=0.1)


class Scalar(nn.Module):
    """A parameter-free backbone: the 1-D input is the feature (feature_dim 1)."""

    feature_dim = 1
    head_bias = False

    def forward(self, x):
        return x


class Batches:
    """The one datamodule method the regularisers read: the task's plain training loader."""

    def __init__(self, x, y, batch_size):
        self.loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)

    def plain_train_dataloader(self):
        return self.loader


def two_parameter(cls, **kwargs):
    m = cls(IncrementalClassifier(Scalar()), optimizer=SGD, **kwargs)
    m.begin_task(0, 2, None)
    with torch.no_grad():
        m.net.head.slices[0].weight.copy_(torch.tensor([[0.5], [-1.0]]))  # the two parameters w0, w1
    return m


def test_fisher_on_a_two_parameter_model_by_hand():
    m = two_parameter(EWC)
    x = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    data = Batches(x, torch.zeros(4, dtype=torch.long), batch_size=2)
    fisher = m.task_importance(data)["head.slices.0.weight"]

    # logits z_j = w_j x; predicted label ŷ = argmax_j z_j (not the true label 0);
    # ∂CE/∂w_j = (softmax(z)_j − [j = ŷ]) · x. Per batch b: g_b = mean over the batch of that;
    # F = Σ_b g_b² · |b| / (number of batches).
    w = torch.tensor([0.5, -1.0])
    expected = torch.zeros(2)
    for batch in (x[:2, 0], x[2:, 0]):
        g = torch.zeros(2)
        for xi in batch:
            z = w * xi
            p = torch.softmax(z, 0)
            onehot = F.one_hot(z.argmax(), 2).float()
            g += (p - onehot) * xi / len(batch)
        expected += g**2 * len(batch) / 2
    # the labels used are the predictions: x=1 → ŷ=0, x=−2 → ŷ=1, x=0.5 → 0, x=3 → 0
    assert torch.allclose(fisher[:, 0], expected, atol=1e-7)
    assert m.fisher_samples is None and m.online is False


def test_fisher_samples_is_single_images():
    m = two_parameter(EWC, fisher_samples=3)
    x = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    loader = m.fisher_loader(Batches(x, torch.zeros(4, dtype=torch.long), batch_size=4))
    assert len(loader) == 3 and loader.batch_size == 1
    with pytest.raises(ValueError):
        two_parameter(EWC, fisher_samples=0)


def end_task_with(m, importance_scale, shift):
    """Store a slot with a known importance, then move the weights."""
    m.task_importance = lambda dm: {n: torch.full_like(p, importance_scale).detach()
                                    for n, p in m.regularised_parameters().items()}
    m.on_task_end(None)
    with torch.no_grad():
        m.net.head.slices[0].weight.add_(shift)


def test_ewc_keeps_one_anchor_and_fisher_per_task_and_online_sums_into_one():
    per_task = two_parameter(EWC, reg_coef=3.0)
    w0 = per_task.net.head.slices[0].weight.detach().clone()
    end_task_with(per_task, 2.0, 0.1)   # slot 0: Ω = 2 at w0; weights now w0 + 0.1
    end_task_with(per_task, 5.0, 0.2)   # slot 1: Ω = 5 at w0 + 0.1; weights now w0 + 0.3
    assert len(per_task.slots) == 2
    # Σ_k Σ Ω_k (θ − θ*_k)² over the two parameters: 2·(0.3²)·2 + 5·(0.2²)·2
    assert per_task.penalty().item() == pytest.approx(2 * 0.09 * 2 + 5 * 0.04 * 2, rel=1e-5)
    assert torch.allclose(per_task.slots[0]["anchor"]["head.slices.0.weight"], w0)

    online = two_parameter(EWC, online=True)
    end_task_with(online, 2.0, 0.1)
    end_task_with(online, 5.0, 0.2)
    assert len(online.slots) == 1  # EWC_online: latest anchor (w0 + 0.1), Fishers summed (2 + 5)
    assert online.penalty().item() == pytest.approx(7 * 0.04 * 2, rel=1e-5)


def test_l2_is_online_with_a_unit_importance_replaced_each_task():
    m = two_parameter(L2, reg_coef=0.5)
    m.on_task_end(None)
    with torch.no_grad():
        m.net.head.slices[0].weight.add_(0.1)
    m.on_task_end(None)
    with torch.no_grad():
        m.net.head.slices[0].weight.add_(0.2)
    assert len(m.slots) == 1
    assert torch.equal(m.slots[0]["importance"]["head.slices.0.weight"], torch.ones(2, 1))
    assert m.penalty().item() == pytest.approx(2 * 0.04, rel=1e-5)  # (0.2)² on each of the two weights
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([0, 1])
    terms = m.loss(x, y)
    assert torch.allclose(terms["loss"], terms["ce"] + 0.5 * terms["reg"])
    assert L2(IncrementalClassifier(Scalar()), optimizer=SGD, online=False).online is False


def test_all_parameters_are_regularised_and_state_round_trips():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(3, 4))
    backbone.feature_dim = 4
    m = EWC(IncrementalClassifier(backbone), optimizer=SGD)
    m.begin_task(0, 2, None)
    data = Batches(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), batch_size=4)
    m.end_task(data)
    assert set(m.slots[0]["importance"]) == {"backbone.0.weight", "backbone.0.bias",
                                             "head.slices.0.weight", "head.slices.0.bias"}
    assert all((f >= 0).all() for f in m.slots[0]["importance"].values())
    m.begin_task(1, 2, None)
    m.end_task(data)
    assert len(m.slots) == 2 and "head.slices.1.weight" in m.slots[1]["anchor"]
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.05)
    state = m.extra_state()
    assert all(isinstance(v, torch.Tensor) for kind in state.values() for v in kind.values())
    fresh = EWC(IncrementalClassifier(backbone), optimizer=SGD)
    fresh.task_sizes, fresh.net = m.task_sizes, m.net
    fresh.load_extra_state(state)
    assert fresh.penalty().item() == pytest.approx(m.penalty().item(), rel=1e-6) and m.penalty().item() > 0
