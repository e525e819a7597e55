"""`cuda_graph: auto|true|false`: the setting and its rule, and the step the pixel and generator engines capture.
On this CPU the step runs as is — it must give the images of DeepInversion's and ABD's loops written out here,
read nothing back to the host and make no tensor there — and replayed from a trace (`ReplayedStep`: what a CUDA
graph's replay does to a step that rebinds state or reads host values, it does too), where it must give the
eager images. The capture itself is checked on a GPU (test_gpu.py)."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from helpers import small_teacher
from torch.utils._python_dispatch import TorchDispatchMode

from cl_inversion.inversion import GeneratorInversion, PixelInversion
from cl_inversion.inversion.common import BNStatistics, clamp_to, jitter_flip, jitter_plan, planned_view
from cl_inversion.inversion.graphing import GRAPH_MIN_STEPS, StepGraph, check_cuda_graph, use_graphs
from cl_inversion.utils.errors import ConfigError

RANGE = (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0))
#: ops that read a tensor's value back to the host (on a GPU: a synchronisation a CUDA graph cannot hold)
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")


def test_cuda_graph_setting_is_true_false_or_auto():
    assert [check_cuda_graph(v, "default", "pixel") for v in (True, False, "auto")] == [True, False, "auto"]
    with pytest.raises(ConfigError, match=r"inversion.pixel.cuda_graph='on': choose true, false or auto"):
        check_cuda_graph("on", "default", "pixel")
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead"):
        check_cuda_graph(True, "reduce-overhead", "generator")
    with pytest.raises(ConfigError, match="cuda_graph"):
        PixelInversion(cuda_graph="sometimes")


def test_auto_captures_on_cuda_only_and_true_refuses_a_cpu():
    notes: list[str] = []
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not use_graphs("auto", 10_000, cpu, "default", notes, "pixel") and notes == []
    assert use_graphs("auto", GRAPH_MIN_STEPS, cuda, "default", notes, "pixel")
    assert not use_graphs("auto", GRAPH_MIN_STEPS - 1, cuda, "default", notes, "pixel")
    assert not use_graphs("auto", 10_000, cuda, "reduce-overhead", notes, "pixel")
    assert use_graphs(True, 2, cuda, "default", notes, "pixel")  # forced: even a phase too short to pay
    assert not use_graphs(False, 10_000, cuda, "default", notes, "pixel")
    assert len(notes) == 4 and "on" in notes[0] and "reduce-overhead" in notes[2], notes
    with pytest.raises(ConfigError, match="inversion.generator.cuda_graph=true needs a CUDA device"):
        use_graphs(True, 100, cpu, "default", notes, "generator")


def test_per_layer_captures_convolutional_teachers_only():
    from cl_inversion.inversion import PerLayerInversion

    with pytest.raises(ConfigError, match="cuda_graph=true: the phases of statistics='data'"):
        PerLayerInversion(statistics="data", start_block=1, cuda_graph=True)
    vit = PerLayerInversion(statistics="data", start_block=1)  # auto: eager, on any device
    assert vit.cuda_graph == "auto" and not vit.graphs(small_teacher(0, 2))


def test_a_step_graph_without_capture_is_the_step():
    calls = []
    graph = StepGraph(lambda: calls.append(1) or len(calls), capture=False)
    assert [graph() for _ in range(5)] == [1, 2, 3, 4, 5] and not graph.captured


@pytest.mark.parametrize(("max_shift", "flip", "shape"), [(2, False, (8, 8)), (3, True, (6, 9)), (0, True, (5, 5)),
                                                           (0, False, (4, 7))])
def test_the_jitter_plan_gives_jitter_flips_views(max_shift, flip, shape):
    """Drawn up front, the plan's gathers are the views `jitter_flip` makes step by step from the same seed."""
    x = torch.randn(2, 3, *shape)
    torch.manual_seed(4)
    expected = [jitter_flip(x, max_shift, flip) for _ in range(12)]
    torch.manual_seed(4)
    plan = jitter_plan(12, *shape, max_shift, flip)
    assert plan.shape == (12, sum(shape))
    for row, view in zip(plan, expected):
        assert torch.equal(planned_view(x, row), view)


def deepinversion_reference(teacher, targets, steps: int, lr: float, seed: int) -> torch.Tensor:
    """DeepInversion's loop as NVlabs' CIFAR script writes it (a roll of ≤2 pixels drawn per step, Adam, CE +
    10·BN norm distance + 2.5e-5·TV(L2)), with our clamp after each step, on the teacher's CPU."""
    from cl_inversion.inversion.common import total_variation_l2

    torch.manual_seed(seed)
    x = torch.randn(len(targets), 1, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    with BNStatistics(teacher) as bn:
        for _ in range(steps):
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            view = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = (F.cross_entropy(teacher(view), targets) + 10.0 * bn.norm_distance(1.0)
                    + 2.5e-5 * total_variation_l2(view))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(clamp_to(x, *RANGE))
    return x.detach()


def test_the_pixel_step_gives_deepinversions_images():
    teacher = small_teacher(0, 2)
    torch.manual_seed(1)
    engine = PixelInversion(steps=6, batch_size=8, lr=0.1, progress=False, compile=False)
    engine.setup((1, 8, 8), RANGE)
    images, labels = engine.synthesize(teacher, [0, 1], 8)
    assert torch.allclose(images, deepinversion_reference(teacher, labels, 6, 0.1, seed=1), atol=1e-6)


def abd_reference(teacher, generator, steps: int, batch: int, lr: float) -> None:
    """ABD's generator loop (GT-RIPL/AlwaysBeDreaming-DFCIL `Teacher.get_images`): a fresh latent batch each
    step, the generator's loss, Adam."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    engine = GeneratorInversion(progress=False)
    with BNStatistics(teacher) as bn:
        for _ in range(steps):
            images = generator(torch.randn(batch, generator.z_dim))
            loss = engine.loss_terms(teacher, bn, images, 2)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_the_generator_step_trains_as_abds_loop():
    teacher = small_teacher(0, 2)
    engine = GeneratorInversion(steps=4, batch_size=8, z_dim=16, lr=1e-2, progress=False, compile=False)
    engine.setup((1, 8, 8), RANGE)
    torch.manual_seed(3)
    engine._fresh_generator(torch.device("cpu"), engine.lr)
    reference = GeneratorInversion(z_dim=16)
    reference.setup((1, 8, 8), RANGE)
    reference._fresh_generator(torch.device("cpu"), engine.lr)
    reference.generator.load_state_dict(engine.generator.state_dict())
    torch.manual_seed(7)
    engine._train(teacher, 2)
    torch.manual_seed(7)
    abd_reference(teacher, reference.generator.train(), 4, 8, engine.lr)
    for (name, ours), theirs in zip(engine.generator.state_dict().items(), reference.generator.state_dict().values()):
        assert torch.allclose(ours, theirs, atol=1e-6), name


class HostReads(TorchDispatchMode):
    """Records ops that read a value back to the host, except Adam's own: on a CPU its update reads the step
    count (its `capturable` form on a GPU does not, by PyTorch's design); `counting` switches recording."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and str(func).startswith(HOST_READS):
            stack = "".join(traceback.format_stack())
            if "torch/optim/" not in stack:
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_generator_step_reads_nothing_back_to_the_host():
    engine = GeneratorInversion(steps=5, batch_size=8, z_dim=16, progress=False, compile=False, log_every=100)
    engine.setup((1, 8, 8), RANGE)
    engine._fresh_generator(torch.device("cpu"), engine.lr)
    with HostReads() as mode:
        engine._train(small_teacher(0, 2), 2)  # the one read is the progress bar's, at the last step (a list copy)
    assert mode.reads == []


def test_the_pixel_step_reads_nothing_back_to_the_host():
    engine = PixelInversion(steps=5, batch_size=8, progress=False, compile=False, log_every=100)
    engine.setup((1, 8, 8), RANGE)
    mode = HostReads()
    mode.counting = False
    engine.step_hook = lambda images, step: setattr(mode, "counting", -1 <= step < 4)  # steps 0-3: no log point
    with mode:
        engine.synthesize(small_teacher(0, 2), [0, 1], 8)
    assert mode.reads == []


def test_the_old_jitter_read_the_host_every_step():
    """The check above can fail: `jitter_flip`, the step's earlier form, read its shifts as Python numbers."""
    with HostReads() as mode:
        jitter_flip(torch.randn(1, 1, 4, 4), 2, False)
    assert "aten._local_scalar_dense.default" in mode.reads


class HostMadePixelLoss(PixelInversion):
    """The pixel loss with tensors made without a device landing on `meta`: a tensor made on the host and moved to
    the step's device (which a CUDA graph would replay from freed host memory) cannot be copied from there."""

    def loss(self, *args, **kwargs):
        with torch.device("meta"):
            return super().loss(*args, **kwargs)


class HostMadeGeneratorLoss(GeneratorInversion):
    def loss_terms(self, *args, **kwargs):
        with torch.device("meta"):
            return super().loss_terms(*args, **kwargs)


@pytest.mark.parametrize("engine_type", [HostMadePixelLoss, HostMadeGeneratorLoss])
def test_the_losses_make_no_tensor_on_the_host(engine_type):
    engine = engine_type(steps=2, batch_size=8, progress=False, compile=False)
    engine.setup((1, 8, 8), RANGE)
    images, _ = engine.synthesize(small_teacher(0, 2), [0, 1], 8)
    assert images.device.type == "cpu" and torch.isfinite(images).all()


class ReplayedStep(StepGraph):
    """`StepGraph`'s capture, emulated on a CPU: after the warm-up the step is traced once (`make_fx` on real
    tensors: every tensor it reads becomes a constant of the trace, as a CUDA graph fixes the memory it reads)
    and each later call reruns the trace, not the Python. A step that reads a value the host changed instead of
    a tensor, or rebinds its state instead of updating it in place, drifts from the eager step here as a
    replayed CUDA graph would."""

    traces = 0

    def __init__(self, step, capture: bool, engine: str = "<engine>", warmup: int = 3) -> None:
        self.step, self.capture, self.warmup, self.engine = step, capture, warmup, engine
        self.calls, self.graph, self.outputs, self.side = 0, None, None, None

    def __call__(self):
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            return self.step()
        if self.graph is None:
            from torch.fx.experimental.proxy_tensor import make_fx

            ReplayedStep.traces += 1
            traced: list = []
            self.graph = make_fx(lambda: traced.append(self.step()) or traced[0])()  # runs the step once
            return traced[0]
        with torch.no_grad():  # the trace holds the backward's ops: nothing for autograd to record
            return self.graph()


@pytest.fixture
def fused_adam_steps(monkeypatch):
    """`steps(replayed)`: the engines' steps with Adam's fused update (its step counts stay tensors, as the
    capturable update's do on a GPU; PyTorch has no capturable update on a CPU), run eagerly or — `replayed` —
    on the `cuda_graph` path, the capture emulated by `ReplayedStep`. Both use the same kernels, so the two
    must agree exactly."""
    from cl_inversion.inversion import generator, graphing, per_layer, pixel

    adam_update = graphing.adam_update

    def steps(replayed: bool) -> None:
        ReplayedStep.traces = 0
        for module in (graphing, generator, per_layer):
            monkeypatch.setattr(module, "adam_update", lambda optimizer, fused=False, capturable=False:
                                adam_update(optimizer, fused=True))
            monkeypatch.setattr(module, "StepGraph", ReplayedStep if replayed else StepGraph)
        for module in (pixel, generator, per_layer):
            monkeypatch.setattr(module, "use_graphs", lambda *args: replayed)

    return steps


@pytest.mark.parametrize("options", [{}, {"flip": True, "lr_schedule": "cosine"}])
def test_the_replayed_pixel_step_gives_the_eager_images(fused_adam_steps, options):
    def images(replayed: bool) -> torch.Tensor:
        fused_adam_steps(replayed)
        torch.manual_seed(1)
        engine = PixelInversion(steps=9, batch_size=8, lr=0.1, progress=False, compile=False, **options)
        engine.setup((1, 8, 8), RANGE)
        return engine.synthesize(small_teacher(0, 2), [0, 1], 12)[0]  # a batch of 8, then one of 4

    eager = images(False)
    replayed = images(True)
    assert ReplayedStep.traces == 2  # one per batch: 3 warm-up steps, the traced one, 5 replays
    assert torch.allclose(replayed, eager, rtol=0, atol=1e-6), (replayed - eager).abs().max()


def test_the_replayed_generator_step_trains_as_the_eager_one(fused_adam_steps):
    def trained(replayed: bool) -> GeneratorInversion:
        fused_adam_steps(replayed)
        torch.manual_seed(1)
        engine = GeneratorInversion(steps=9, batch_size=8, z_dim=16, lr=1e-2, progress=False, compile=False)
        engine.setup((1, 8, 8), RANGE)
        engine.synthesize(small_teacher(0, 2), [0, 1], 8)
        return engine

    eager = trained(False)
    replayed = trained(True)
    assert ReplayedStep.traces == 1
    eager_state = eager.generator.state_dict()
    for name, value in replayed.generator.state_dict().items():  # weights, BN affine and running statistics
        assert torch.allclose(value.float(), eager_state[name].float(), rtol=0, atol=1e-6), name
    assert [row["loss"] for row in replayed.stats.curve] == pytest.approx([row["loss"] for row in eager.stats.curve])


@pytest.mark.parametrize("options", [{}, {"boost": False, "keep_best": False, "ce_weight": 0.5, "tv_weight": 1e-4}])
def test_the_replayed_per_layer_phases_give_the_eager_images(fused_adam_steps, options):
    """PMI's per-block phase (every block: its start, BN-input KL and prior, boosted weights, the best iterate kept)
    and full-model phase (warm-up then multi-step learning rate), each step replayed after the warm-up."""
    from cl_inversion.inversion import PerLayerInversion

    teacher = small_teacher(0, 2)

    def images(replayed: bool) -> torch.Tensor:
        fused_adam_steps(replayed)
        torch.manual_seed(1)
        engine = PerLayerInversion(layer_steps=6, full_steps=9, batch_size=8, warmup=2, milestones=[3, 5],
                                   progress=False, compile=False, **options)
        engine.setup((1, 8, 8), RANGE)
        engine.graphs_now = engine.graphs(teacher)
        targets = torch.randn(8, teacher.backbone.feature_dim)
        return engine.invert_batch(teacher, targets, torch.tensor([0, 1] * 4))

    eager = images(False)
    replayed = images(True)
    assert ReplayedStep.traces == len(teacher.backbone.blocks()) + 1
    assert torch.allclose(replayed, eager, rtol=0, atol=1e-5), (replayed - eager).abs().max()


def test_a_replayed_step_that_rebinds_its_state_drifts():
    """The emulation can fail: a step that rebinds its state (`x = x + 1`) is replayed on the state it was
    traced with, as a CUDA graph would be."""
    state = {"x": torch.zeros(())}

    def step() -> torch.Tensor:
        state["x"] = state["x"] + 1
        return state["x"]

    graph = ReplayedStep(step, capture=True)
    assert [float(graph()) for _ in range(6)] == [1, 2, 3, 4, 4, 4]
