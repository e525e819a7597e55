"""On a CUDA machine (skipped elsewhere): the `gpu` trainer preset end to end, every synthesis engine on
the trainer's GPU (not on the CPU where fit's teardown leaves the module), bf16-mixed synthesis, compiled
synthesis, and whole-step CUDA graphs (`cuda_graph`) against the eager step."""

from __future__ import annotations

import math

import pytest
import torch

from cl_inversion.run import compose, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["trainer=gpu", "logger=none", "scenario.n_tasks=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "inversion.n_images=40", "++inversion.pixel.steps=5", "++inversion.generator.steps=5",
        "++inversion.rdfcil_generator.steps=5", "++inversion.per_layer.layer_steps=3",
        "++inversion.per_layer.full_steps=3"]


@pytest.mark.parametrize(("method", "engine", "precision"), [
    ("deepinversion", "pixel", "32"), ("abd", "generator", "32"), ("rdfcil", "rdfcil_generator", "32"),
    ("pmi", "per_layer", "32"), ("abd", "generator", "bf16-mixed"), ("deepinversion", "pixel", "bf16-mixed")])
def test_every_engine_synthesises_on_the_trainers_gpu(tmp_path, method, engine, precision):
    extra = [] if precision == "32" else [f"inversion.{engine}.precision={precision}"]
    cfg = compose([*TINY, f"method={method}", *extra])
    results = run(cfg, run_dir=tmp_path).to_dict()
    assert results["status"] == "completed" and results["provenance"]["device"].startswith("cuda")
    record = results["inversion"][0]
    assert record["engine"] == engine.removeprefix("rdfcil_") and record["device"].startswith("cuda"), record
    assert 0 <= record["teacher_accuracy"] <= 100 and math.isfinite(record["feature_distance"])


def test_batch_moments_on_the_gpu_equal_the_two_pass_form():
    from cl_inversion.inversion.common import batch_moments

    x = (torch.randn(64, 16, 8, 8, device="cuda") * 3 + 5).requires_grad_(True)
    mean, var = batch_moments(x, shift=torch.full((16,), 5.0, device="cuda"))
    assert torch.allclose(mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5)
    var.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_and_graphed_pixel_steps_give_the_eager_images_on_the_gpu(mode):
    """`compile: true` (and `compile_mode: reduce-overhead`, CUDA graphs) against eager, on the GPU."""
    from cl_inversion.inversion import PixelInversion
    from cl_inversion.models import CifarResNet, IncrementalClassifier

    torch.manual_seed(0)
    teacher = IncrementalClassifier(CifarResNet(8, in_channels=3, variant="abd"))
    teacher.grow(4)
    teacher = teacher.cuda().eval()
    pixel_range = (torch.full((3, 1, 1), -2.0), torch.full((3, 1, 1), 2.0))

    def images(compile: bool) -> torch.Tensor:
        torch.manual_seed(1)
        engine = PixelInversion(steps=5, batch_size=16, lr=0.05, progress=False, compile=compile, compile_mode=mode,
                                cuda_graph=False)
        engine.setup((3, 32, 32), pixel_range)
        return engine.synthesize(teacher, [0, 1, 2, 3], 16)[0]

    assert torch.allclose(images(True), images(False), atol=1e-3)


def test_the_generator_alternates_eager_and_compiled_boundaries_on_the_gpu():
    """ABD keeps its generator and Adam across boundaries: a compiled boundary (fused Adam, step counts on the
    GPU) between eager ones (step counts on the host) must run, and train."""
    from cl_inversion.inversion import GeneratorInversion
    from cl_inversion.models import CifarResNet, IncrementalClassifier

    torch.manual_seed(0)
    teacher = IncrementalClassifier(CifarResNet(8, in_channels=3, variant="abd"))
    teacher.grow(4)
    teacher = teacher.cuda().eval()
    engine = GeneratorInversion(steps=3, batch_size=16, z_dim=32, progress=False)
    engine.setup((3, 32, 32), (torch.full((3, 1, 1), -2.0), torch.full((3, 1, 1), 2.0)))
    for compile in (False, True, False):
        engine.compile = compile
        before = [p.detach().clone() for p in engine.generator.parameters()] if engine.generator else None
        images, _ = engine.synthesize(teacher, [0, 1, 2, 3], 16)
        assert torch.isfinite(images).all()
        if before is not None:
            assert any(not torch.equal(b, p) for b, p in zip(before, engine.generator.parameters()))


def cifar_teacher() -> torch.nn.Module:
    from cl_inversion.models import CifarResNet, IncrementalClassifier

    torch.manual_seed(0)
    teacher = IncrementalClassifier(CifarResNet(8, in_channels=3, variant="abd"))
    teacher.grow(4)
    teacher.train()
    with torch.no_grad():
        teacher(torch.randn(64, 3, 32, 32))  # BN running statistics of its own
    return teacher.cuda().eval()


GPU_RANGE = (torch.full((3, 1, 1), -2.0), torch.full((3, 1, 1), 2.0))


@pytest.mark.parametrize(("compile", "schedule"), [(False, "constant"), (False, "cosine"), (True, "constant")])
def test_the_captured_pixel_step_gives_the_eager_images(compile, schedule):
    """`cuda_graph: true`: 3 warm-up steps, one capture, replays; the same images as the eager step (Adam's
    capturable update rounds its bias correction on the device: the tolerance), and the record says so."""
    from cl_inversion.inversion import PixelInversion

    teacher = cifar_teacher()

    def images(graphed: bool) -> tuple[torch.Tensor, list[str]]:
        torch.manual_seed(1)
        engine = PixelInversion(steps=12, batch_size=16, lr=0.05, progress=False, compile=compile,
                                cuda_graph=graphed, lr_schedule=schedule, flip=True, log_every=5)
        engine.setup((3, 32, 32), GPU_RANGE)
        return engine.synthesize(teacher, [0, 1, 2, 3], 24)[0], engine.stats.notes

    (graphed, notes), (eager, _) = images(True), images(False)
    assert any("cuda_graph True: on" in note for note in notes), notes
    assert graphed.shape == eager.shape == (24, 3, 32, 32)
    assert torch.allclose(graphed, eager, atol=1e-3), (graphed - eager).abs().max()


@pytest.mark.parametrize("compile", [False, True])
def test_the_captured_generator_step_trains_as_the_eager_one(compile):
    from cl_inversion.inversion import GeneratorInversion

    teacher = cifar_teacher()

    def trained(graphed: bool) -> GeneratorInversion:
        torch.manual_seed(1)
        engine = GeneratorInversion(steps=12, batch_size=32, z_dim=64, progress=False, compile=compile,
                                    cuda_graph=graphed, log_every=5)
        engine.setup((3, 32, 32), GPU_RANGE)
        engine.synthesize(teacher, [0, 1, 2, 3], 16)
        return engine

    graphed, eager = trained(True), trained(False)
    assert any("cuda_graph True: on" in note for note in graphed.stats.notes), graphed.stats.notes
    assert graphed.optimizer.param_groups[0]["capturable"] is False  # restored: checkpoints keep the default
    eager_state = eager.generator.state_dict()
    for name, value in graphed.generator.state_dict().items():
        if value.is_floating_point() and value.dim() > 1:  # see the CPU test: biases before a BN are noise
            assert torch.allclose(value, eager_state[name], atol=1e-4), name
    curve_graphed = [row["loss"] for row in graphed.stats.curve]
    curve_eager = [row["loss"] for row in eager.stats.curve]
    assert curve_graphed == pytest.approx(curve_eager, rel=1e-3)


def test_a_kept_generator_alternates_captured_and_eager_boundaries_on_the_gpu():
    """ABD keeps its generator and Adam: a captured boundary (capturable Adam, step counts on the GPU) between
    eager ones, then the step counts back on the host."""
    from cl_inversion.inversion import GeneratorInversion

    teacher = cifar_teacher()
    engine = GeneratorInversion(steps=8, batch_size=16, z_dim=32, progress=False, compile=False)
    engine.setup((3, 32, 32), GPU_RANGE)
    for graphed in (False, True, False, True):
        engine.cuda_graph = graphed
        images, _ = engine.synthesize(teacher, [0, 1, 2, 3], 16)
        assert torch.isfinite(images).all()
    steps = [state["step"] for state in engine.optimizer.state.values()]
    assert steps and all(float(s) == 32 and s.device.type == "cpu" for s in steps)


def test_a_run_captures_its_synthesis_by_default(tmp_path):
    """`cuda_graph: auto` on the `gpu` preset: ABD's boundary is captured, and the run's record says so."""
    cfg = compose([*TINY, "method=abd", "++inversion.generator.steps=20"])
    results = run(cfg, run_dir=tmp_path).to_dict()
    notes = results["inversion"][0]["notes"]
    assert results["status"] == "completed" and any("cuda_graph auto: on" in n for n in notes), notes


def test_the_captured_per_layer_phases_give_the_eager_images():
    """PMI's per-block and full-model phases captured (each after its warm-up) against eager."""
    from cl_inversion.inversion import PerLayerInversion

    teacher = cifar_teacher()

    def images(graphed: bool) -> torch.Tensor:
        torch.manual_seed(1)
        engine = PerLayerInversion(layer_steps=8, full_steps=12, batch_size=32, progress=False, compile=False,
                                   cuda_graph=graphed)
        engine.setup((3, 32, 32), GPU_RANGE)
        engine.graphs_now = engine.graphs(teacher)
        targets = torch.randn(32, teacher.backbone.feature_dim, device="cuda")
        return engine.invert_batch(teacher, targets, torch.arange(4, device="cuda").repeat(8))

    graphed, eager = images(True), images(False)
    assert torch.allclose(graphed, eager, atol=1e-3), (graphed - eager).abs().max()
