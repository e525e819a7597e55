"""On a CUDA machine (skipped elsewhere): the `gpu` trainer preset end to end, every synthesis engine on
the trainer's GPU (not on the CPU where fit's teardown leaves the module), and
bf16-mixed synthesis."""

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
        engine = PixelInversion(steps=5, batch_size=16, lr=0.05, progress=False, compile=compile, compile_mode=mode)
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
