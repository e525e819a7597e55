"""VDFD: rank-1 compression, the regulariser against a direct computation, what is stored, resume, CLI."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, read_results, run_cli
from torch import nn

from cl_inversion.data import ClassIncrementalScenario, digits
from cl_inversion.io import load_checkpoint, save_checkpoint
from cl_inversion.methods import VDFD
from cl_inversion.methods.vdfd import bilinear, rank1, state_bytes
from cl_inversion.models import IncrementalClassifier, SmallCNN
from cl_inversion.run import checkpoint_state, restore

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def make(width: int = 8, seed: int = 0, **kwargs) -> VDFD:
    torch.manual_seed(seed)
    return VDFD(IncrementalClassifier(SmallCNN(1, width=width)), optimizer=SGD, **kwargs)


@pytest.fixture(scope="module")
def scenario():
    return ClassIncrementalScenario(digits(), n_tasks=5)


def test_rank1_factors_reproduce_the_inner_product_of_a_rank1_gradient():
    torch.manual_seed(0)
    a, b = torch.randn(6), torch.randn(4 * 3 * 3)
    grad = torch.outer(a, b).reshape(6, 4, 3, 3)  # a conv weight's gradient of rank 1
    weight = torch.randn(6, 4, 3, 3)
    u, v = rank1(grad)
    assert u.shape == (6,) and v.shape == (36,)
    assert torch.allclose(bilinear(u[None], v[None], weight), (grad * weight).sum()[None], rtol=1e-4, atol=1e-5)
    bias_grad, bias = torch.randn(5), torch.randn(5)  # 1-D tensors are kept exactly
    u, v = rank1(bias_grad)
    assert torch.allclose(bilinear(u[None], v[None], bias), (bias_grad * bias).sum()[None])
    u, v = rank1(torch.zeros(3, 4))
    assert not u.any() and not v.any()


def test_regulariser_matches_a_direct_computation_with_materialised_gradients():
    m = make(width=4, reg_coef=50.0)
    m.begin_task(0, 2, None)
    params = dict(m.net.named_parameters())
    names = ["backbone.stem.0.weight", "backbone.stages.1.0.weight", "head.slices.0.bias"]
    torch.manual_seed(1)
    m.factors = {n: (torch.randn(2, params[n].shape[0]), torch.randn(2, params[n][0].numel())) for n in names}
    m.anchor = torch.randn(2)
    m.class_vectors = torch.randn(2, m.net.backbone.feature_dim)
    quadratic, log_det = m.regulariser()

    # G with full rows g_c = concat(vec(u_c v_cᵀ)) over the tensors, θ the concatenated weights
    G = torch.stack([torch.cat([torch.outer(m.factors[n][0][c], m.factors[n][1][c]).flatten() for n in names])
                     for c in range(2)]).double()
    theta = torch.cat([params[n].detach().flatten() for n in names]).double()
    drift = G @ theta - m.anchor.double()
    x = m.class_vectors.double()
    unit = F.normalize(x, dim=1)
    a = (unit @ unit.T).clamp_min(0)
    adj = torch.diag(a.sum(1) ** -0.5) @ a @ torch.diag(a.sum(1) ** -0.5)
    w1, w2 = m.gcn.layer1.weight.detach().double(), m.gcn.layer2.weight.detach().double()
    h = F.normalize(adj @ (torch.relu(adj @ x @ w1.T) @ w2.T) + unit, dim=1)
    P = h @ h.T
    assert torch.allclose(torch.diag(P), torch.ones(2, dtype=torch.float64))
    assert quadratic.item() == pytest.approx((drift @ P @ drift).item(), rel=1e-4)
    assert log_det.item() == pytest.approx(math.log(1 / torch.det(P + 1e-3 * torch.eye(2)).item()), rel=1e-4)

    x_batch, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    terms = m.loss(x_batch, y)
    assert torch.allclose(terms["loss"], terms["ce"] + 50.0 * (terms["quadratic"] + terms["log_det"]))
    terms["loss"].backward()  # the GCN is learned jointly: it gets gradients and is in the optimiser
    assert m.gcn.layer1.weight.grad is not None and m.gcn.layer1.weight.grad.abs().sum() > 0
    trainable = {id(p) for p in m.trainable_parameters()}
    assert all(id(p) in trainable for p in m.gcn.parameters())


def test_stored_gradients_are_those_of_the_mean_outputs_over_the_task_data(scenario):
    m = make(width=8, normalize=False)  # raw gradients, so Gθ changes exactly as the mean logits do
    dm = scenario.datamodule(0, 16)
    m.begin_task(0, 2, dm)
    m.end_task(dm)
    assert set(m.factors) == {n for n, _ in m.net.named_parameters()}
    assert m.regulariser()[0].item() == pytest.approx(0.0, abs=1e-6)  # no drift at θ*

    def mean_logits():
        m.net.eval()
        with torch.no_grad():
            return torch.cat([m.net(x) for x, _ in dm.plain_train_dataloader()]).mean(0)

    before, linear_before = mean_logits(), m.linearised_outputs().detach()
    with torch.no_grad():  # logits are linear in the head and its gradients are exactly rank 1
        head = m.net.head.slices[0]
        head.weight.add_(0.1 * torch.randn_like(head.weight))
        head.bias.add_(0.1 * torch.randn_like(head.bias))
    assert torch.allclose(mean_logits() - before, m.linearised_outputs().detach() - linear_before, atol=1e-5)

    old = {n: (u.clone(), v.clone()) for n, (u, v) in m.factors.items()}
    dm1 = scenario.datamodule(1, 16)
    m.begin_task(1, 2, dm1)
    m.end_task(dm1)
    assert len(m.anchor) == 4 and m.class_vectors.shape == (4, m.net.backbone.feature_dim)
    assert all(torch.equal(m.factors[n][0][:2], u) for n, (u, _) in old.items())  # old classes keep theirs
    assert not m.factors["head.slices.1.weight"][0][:2].any()  # old classes: zero gradient on the new slice


def test_keeps_no_network_copy_and_no_data_and_little_memory(scenario):
    m = make(width=32)
    for t in range(2):
        dm = scenario.datamodule(t, 16)
        m.begin_task(t, 2, dm)
        m.end_task(dm)
    assert m.previous is None
    norms = sum((u.norm(dim=1) * v.norm(dim=1)) ** 2 for u, v in m.factors.values())
    assert torch.allclose(norms, torch.ones(4))  # normalize=True: unit-norm compressed gradient per class
    assert set(dict(m.named_children())) == {"net", "gcn"}
    assert not [k for k, v in vars(m).items() if isinstance(v, nn.Module)]

    def tensors(state):
        if isinstance(state, torch.Tensor):
            yield state
        elif isinstance(state, dict):
            for v in state.values():
                yield from tensors(v)
        elif isinstance(state, (list, tuple)):
            for v in state:
                yield from tensors(v)

    stored = list(tensors(m.extra_state()))
    images = scenario.train.images
    assert stored and all(t.dim() <= 2 for t in stored)  # no image batches (4-D), only vectors and matrices
    assert not any(t.shape[0] == len(images) or t.shape[-2:] == images.shape[-2:] for t in stored)
    net_bytes = sum(p.numel() * p.element_size() for p in m.net.parameters())
    assert m.memory_footprint() == state_bytes(m.extra_state()) == sum(t.numel() * t.element_size() for t in stored)
    assert m.memory_footprint() < 0.25 * net_bytes
    per_class = state_bytes({k: v for k, v in m.extra_state().items() if k != "gcn"})
    assert per_class < 0.1 * net_bytes


def test_checkpoint_resume_restores_the_regulariser(scenario, tmp_path):
    m = make(width=8)
    dm = scenario.datamodule(0, 16)
    m.begin_task(0, 2, dm)
    m.end_task(dm)
    m.begin_task(1, 2, scenario.datamodule(1, 16))
    with torch.no_grad():
        for p in [*m.net.parameters(), *m.gcn.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    m.end_task(scenario.datamodule(1, 16))
    with torch.no_grad():
        m.net.backbone.stem[0].weight.add_(0.05)
    save_checkpoint(tmp_path / "task_1.ckpt", checkpoint_state(m, 1, {}))
    fresh = make(width=8, seed=1)  # different initial GCN and network
    restore(fresh, load_checkpoint(tmp_path / "task_1.ckpt"))
    assert torch.equal(fresh.gcn.layer2.weight, m.gcn.layer2.weight)
    got, want = fresh.regulariser(), m.regulariser()
    assert want[0].item() > 0
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    assert got[1].item() == pytest.approx(want[1].item(), rel=1e-5)


def test_cli_run_on_digits(tmp_path):
    run_cli("method=vdfd", "scenario.n_tasks=2", *FAST, run_dir=tmp_path)
    results = read_results(tmp_path)
    assert results["status"] == "completed" and results["tasks_completed"] == 2
    assert 0 < results["final_accuracy"] <= 100
    header, *rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("task_1/quadratic")
    values = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)
