"""VDFD against XiaorongLi-95/VDFD (`agents/vdfd.py`, `models/gcn.py`), the reference formulas written out by
hand: node-averaged gradients of the mean outputs, their rank-1 compression across classes and `comp_GW`, the
GCN precision matrix from a hand-made affinity, the quadratic form and log-det; what is stored, resume, CLI."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, run_in_process
from torch import nn

from cl_inversion.data import ClassIncrementalScenario, digits
from cl_inversion.loop.checkpoints import checkpoint_state, restore
from cl_inversion.methods import VDFD
from cl_inversion.methods.base import state_bytes
from cl_inversion.methods.vdfd import GCN, compress, linearised, normalized_adjacency
from cl_inversion.models import IncrementalClassifier, SmallCNN
from cl_inversion.utils.io import load_checkpoint, save_checkpoint

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def make(width: int = 8, seed: int = 0, **kwargs) -> VDFD:
    torch.manual_seed(seed)
    return VDFD(IncrementalClassifier(SmallCNN(1, width=width)), optimizer=SGD, **kwargs)


@pytest.fixture(scope="module")
def scenario():
    return ClassIncrementalScenario(digits(), n_tasks=5)


def test_compression_is_the_top_singular_triple_and_gw_is_the_reference_comp_gw():
    torch.manual_seed(0)
    # a [nodes, classes] matrix with a clear top singular value: the randomised q=1 SVD finds it
    a, b = torch.randn(6), torch.randn(3)
    m = 5.0 * torch.outer(a, b) + 0.01 * torch.randn(6, 3)
    us, v = compress(m)
    u_ref, s_ref, vh_ref = torch.linalg.svd(m)
    assert torch.allclose(torch.outer(us, v), s_ref[0] * torch.outer(u_ref[:, 0], vh_ref[0]), atol=1e-4)
    assert not any(t.any() for t in compress(torch.zeros(4, 2)))

    # comp_GW: rec = u diag(s) vᵀ [nodes, classes], expanded over the conv weight's fan-in, times w, summed
    w = torch.randn(6, 4, 3, 3)
    rec = torch.outer(us, v)
    by_hand = (rec[:, None, None, None, :] * w[..., None]).sum(dim=[0, 1, 2, 3])
    assert torch.allclose(linearised(us, v, w), by_hand, atol=1e-5)
    bias = torch.randn(6)
    assert torch.allclose(linearised(us, v, bias), (rec * bias[:, None]).sum(0), atol=1e-6)


def test_node_gradients_of_the_mean_outputs_by_hand(scenario):
    m = make(width=4)
    dm = scenario.datamodule(0, 64)
    m.begin_task(0, 2, dm)
    got = m.node_gradients(dm)
    assert set(got) == {n for n, _ in m.net.named_parameters() if not n.startswith("head.")}  # backbone only

    # reference calculate_importance: per batch, per class i: backward of the batch-mean output i; conv grads
    # averaged over [1, 2, 3], linear over dim 1, 1-D as they are; summed over batches / len(loader)
    params = {n: p for n, p in m.net.named_parameters() if not n.startswith("head.")}
    loader = dm.plain_train_dataloader()
    want = {n: torch.zeros(p.shape[0], 2) for n, p in params.items()}
    m.net.eval()
    for x, _ in loader:
        for i in range(2):
            m.net.zero_grad()
            m.net(x)[:, 0:2].mean(0)[i].backward()
            for n, p in params.items():
                g = p.grad
                node = g.mean([1, 2, 3]) if g.dim() == 4 else g.mean(1) if g.dim() == 2 else g
                want[n][:, i] += node / len(loader)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), n


def test_precision_matrix_from_a_hand_made_affinity():
    torch.manual_seed(0)
    gcn = GCN(features=3, hidden=4)
    x = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    a = x @ x.T  # cosine affinity: [[1, .8, 0], [.8, 1, 0], [0, 0, 1]]
    a_hat = a + torch.eye(3)
    degree = a_hat.sum(1)  # 2.8, 2.8, 2
    d = torch.diag(degree ** -0.5)
    adj = d @ a_hat @ d
    assert torch.allclose(normalized_adjacency(a), adj)
    assert adj[0, 1].item() == pytest.approx(0.8 / 2.8) and adj[2, 2].item() == pytest.approx(2 / 2)
    w1, b1 = gcn.layer1.weight.detach(), gcn.layer1.bias.detach()
    w2, b2 = gcn.layer2.weight.detach(), gcn.layer2.bias.detach()
    out = (adj @ torch.relu(adj @ x @ w1.T + b1)) @ w2.T + b2 + x  # gcn.py: layer2(A relu(layer1(A x))) + x
    n = out / out.norm(dim=1, keepdim=True)
    assert torch.allclose(gcn.precision(x), n @ n.T, atol=1e-6)
    assert torch.allclose(torch.diag(gcn.precision(x)), torch.ones(3), atol=1e-6)


def test_quadratic_and_log_det_summed_over_old_tasks_by_hand():
    m = make(width=4, reg_coef=50.0)
    m.begin_task(0, 2, None)
    m.begin_task(1, 3, None)
    params = dict(m.net.named_parameters())
    names = ["backbone.stem.0.weight", "backbone.stages.1.0.weight"]
    torch.manual_seed(1)
    m.terms = [{"u": {n: torch.randn(params[n].shape[0]) for n in names},
                "v": {n: torch.randn(k) for n in names}, "anchor": torch.randn(k)} for k in (2, 3)]
    m.prototypes = [F.normalize(torch.randn(k, m.net.backbone.feature_dim), dim=1) for k in (2, 3)]
    quadratic, log_det = m.regulariser()

    want_q = want_l = 0.0
    for term, proto in zip(m.terms, m.prototypes):
        gw = sum((torch.outer(term["u"][n], term["v"][n])[:, None, None, None, :]
                  * params[n].detach()[..., None]).sum([0, 1, 2, 3]) for n in names)
        drift = (gw - term["anchor"]).double()
        p = m.gcn.precision(proto).detach().double()
        want_q += (drift @ p @ drift).item()  # the paper's square (the reference's expansion agrees at t = 1)
        want_l += math.log(1 / torch.det(p + 1e-3 * torch.eye(len(p), dtype=torch.float64)).item())
    assert quadratic.item() == pytest.approx(want_q, rel=1e-4)
    assert log_det.item() == pytest.approx(want_l, rel=1e-4)

    x, y = torch.randn(4, 1, 8, 8), torch.tensor([2, 3, 4, 2])
    terms = m.loss(x, y)
    ce = F.cross_entropy(m(x)[:, 2:5], y - 2)  # local CE over the current task's outputs (vdfd_la.py)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert torch.allclose(terms["loss"], terms["ce"] + 50.0 * (terms["quadratic"] + terms["log_det"]))
    terms["loss"].backward()  # the GCN is learned jointly
    assert m.gcn.layer1.weight.grad is not None and m.gcn.layer1.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for n, p in m.net.named_parameters()
               if n.startswith("head.slices.0"))  # old head rows get no gradient from the local CE


def test_reference_optimiser_groups_and_bias_free_head():
    m = make(width=4, optimizer_class="torch.optim.Adam", backbone_lr=1e-4, head_lr=1e-3, gcn_lr=1e-4,
             backbone_weight_decay=7e-4, head_weight_decay=0.0, gcn_weight_decay=5e-4)
    m.begin_task(0, 2, None)
    assert m.net.head.slices[0].bias is None  # agent.py: nn.Linear(n_feat, out_dim, bias=False)
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert isinstance(opt, torch.optim.Adam)
    groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert groups == {"backbone": (1e-4, 7e-4), "head": (1e-3, 0.0), "gcn": (1e-4, 5e-4)}
    partial = make(width=4, optimizer_class="torch.optim.Adam", backbone_lr=1e-4, gcn_lr=1e-4)
    partial.begin_task(0, 2, None)
    with pytest.raises(ValueError, match="method.head_lr"):
        partial.configure_optimizers()


def test_task_end_stores_one_term_per_task_with_no_drift_at_its_weights(scenario):
    m = make(width=8)
    for t in range(2):
        dm = scenario.datamodule(t, 32)
        m.begin_task(t, 2, dm)
        if t == 1:  # prototypes: the unit head rows of task 0, taken at the start of task 1
            assert len(m.prototypes) == 1
            assert torch.allclose(m.prototypes[0], F.normalize(m.net.head.weight[:2].detach(), dim=1))
        m.end_task(dm)
    assert len(m.terms) == 2 and [len(t["anchor"]) for t in m.terms] == [2, 2]
    assert m.task_outputs(1).detach().sub(m.terms[1]["anchor"]).abs().max() < 1e-5  # no drift at θ*_1

    assert set(dict(m.named_children())) == {"net", "gcn"}  # no network copy, no data
    stored = [t for term in m.terms for kind in ("u", "v") for t in term[kind].values()]
    assert all(t.dim() == 1 for t in stored)
    net_bytes = sum(p.numel() * p.element_size() for p in m.net.parameters())
    assert m.memory_footprint() == state_bytes(m.extra_state())
    assert state_bytes({"terms": m.terms, "prototypes": m.prototypes}) < 0.1 * net_bytes


def test_checkpoint_resume_restores_the_regulariser(scenario, tmp_path):
    m = make(width=8)
    for t in range(2):
        dm = scenario.datamodule(t, 32)
        m.begin_task(t, 2, dm)
        m.end_task(dm)
    m.begin_task(2, 2, scenario.datamodule(2, 32))
    with torch.no_grad():
        for p in [*m.net.backbone.parameters(), *m.gcn.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "task_2.ckpt", checkpoint_state(m, 2, {}))
    fresh = make(width=8, seed=1)
    restore(fresh, load_checkpoint(tmp_path / "task_2.ckpt"))
    got, want = fresh.regulariser(), m.regulariser()
    assert want[0].item() > 0
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    assert got[1].item() == pytest.approx(want[1].item(), rel=1e-5)
    assert not [k for k, v in vars(fresh).items() if isinstance(v, nn.Module)]


@pytest.mark.slow
def test_run_on_digits(tmp_path):
    results = run_in_process("method=vdfd", "scenario.n_tasks=2", *FAST, run_dir=tmp_path)
    assert results["status"] == "completed" and results["tasks_completed"] == 2
    assert 0 < results["final_accuracy"] <= 100
    header, *rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("task_1/quadratic")
    values = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)
