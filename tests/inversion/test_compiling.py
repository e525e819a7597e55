"""`compile: auto|true|false`: the rule `auto` follows, its choice on the shipped budgets, and compiled graphs
reused across task boundaries (a new teacher of the same architecture: no recompile, its own images)."""

import pytest
import torch
from helpers import small_teacher
from hydra.utils import instantiate

from cl_inversion.build import chosen_engine, compose
from cl_inversion.inversion import GeneratorInversion, PixelInversion
from cl_inversion.inversion.compiling import (
    CPU_BREAK_EVEN_FLOP,
    CUDA_BREAK_EVEN_STEPS,
    check_compile,
    compile_pays,
    decide,
    network_flops,
)
from cl_inversion.models import IncrementalClassifier, SmallCNN
from cl_inversion.utils.errors import ConfigError

CPU = torch.device("cpu")
RANGE = (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0))


def test_compile_setting_is_true_false_or_auto():
    assert check_compile("auto", "default", "pixel") == "auto"
    assert check_compile(False, "reduce-overhead", "pixel") is False
    with pytest.raises(ConfigError, match=r"inversion.pixel.compile='sometimes': choose true, false or auto"):
        PixelInversion(compile="sometimes")
    with pytest.raises(ConfigError, match=r"inversion.generator.compile_mode='fast': choose one of default"):
        GeneratorInversion(compile_mode="fast")


def test_the_auto_rule_is_planned_flops_on_cpu_and_planned_steps_on_cuda():
    per_sample = 1e9  # FLOP per sample, forward
    below = int(CPU_BREAK_EVEN_FLOP / (3 * 128 * per_sample))  # steps just short of the CPU break-even
    assert not compile_pays(below, 128, per_sample, CPU)
    assert compile_pays(below + 1, 128, per_sample, CPU)
    assert not compile_pays(CUDA_BREAK_EVEN_STEPS - 1, 1, 1.0, torch.device("cuda"))
    assert compile_pays(CUDA_BREAK_EVEN_STEPS, 1, 1.0, torch.device("cuda"))
    assert not compile_pays(10**9, 10**9, 1e12, torch.device("mps"))
    notes: list[str] = []
    assert decide("auto", below + 1, 128, lambda: per_sample, CPU, notes, "pixel")
    assert notes and notes[0].startswith("pixel compile auto: on (")
    assert decide(False, 10**9, 128, lambda: 1 / 0, CPU, notes, "pixel") is False  # forced: nothing counted
    assert len(notes) == 1


def test_flops_are_counted_on_a_copy_leaving_the_network_untouched():
    net = IncrementalClassifier(SmallCNN(1, width=4))
    net.grow(2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    net.backbone.register_forward_hook(lambda *a: seen.append(1))
    flops = network_flops(net, torch.zeros(2, 1, 8, 8))
    assert flops > 0 and not seen and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN running stats unchanged


def planned(overrides: list[str]) -> tuple[bool, str]:
    """The `auto` choice a composed run makes at its first boundary (CPU), and the engine."""
    cfg = compose(overrides)
    name, engine_cfg = chosen_engine(cfg)
    engine = instantiate(engine_cfg)
    size = 8 if cfg.dataset._target_.endswith("digits") else cfg.dataset.get("image_size") or 32
    shape = (cfg.dataset.channels, size, size)
    teacher = IncrementalClassifier(instantiate(cfg.backbone))
    teacher.grow(4)
    engine.setup(shape, (torch.full((shape[0], 1, 1), -2.0), torch.full((shape[0], 1, 1), 2.0)))
    if name in ("generator", "rdfcil_generator"):
        engine._fresh_generator(CPU, engine.lr)
    steps, batch = engine.planned_steps(cfg.inversion.n_images)
    flops = engine.step_flops(teacher)
    return compile_pays(steps, batch, flops, CPU), name


@pytest.mark.parametrize("overrides", [[f"method={m}"] for m in ("deepinversion", "abd", "rdfcil", "pmi")]
                         + [["experiment=cifar10_cpu", f"method={m}"] for m in ("deepinversion", "abd", "pmi")])
def test_auto_stays_eager_at_the_digits_and_cifar10_cpu_budgets(overrides):
    """Digits (so the pinned matrices hold) and the 16x16 CPU profile, whose largest boundary (ABD's 1 000
    generator steps, 3.7e13 FLOP) is near the measured break-even, not clearly past it."""
    on, name = planned(overrides)
    assert not on, name


@pytest.mark.parametrize("preset", ["abd_cifar100_10t", "rdfcil_cifar100_10t", "pmi_cifar100_10t",
                                    "deepinversion_cifar100_10t"])
def test_auto_compiles_at_the_published_cifar_budgets(preset):
    on, name = planned([f"experiment={preset}"])
    assert on, name


def pixel_images(teacher: IncrementalClassifier, compile: bool) -> torch.Tensor:
    torch.manual_seed(1)
    engine = PixelInversion(steps=3, batch_size=8, lr=0.1, progress=False, compile=compile)
    engine.setup((1, 8, 8), RANGE)
    return engine.synthesize(teacher, list(range(teacher.num_classes)), 8)[0]


def test_a_later_boundary_reuses_the_compiled_graph_and_gets_its_own_teachers_images():
    """Boundary 2's teacher has new weights, new BN hooks and a larger head: the backbone's compiled graph
    serves it without a recompile, and its images are the eager ones of that teacher (not of the first)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    first, second = small_teacher(0, 2), small_teacher(5, 4)
    compiled_first = pixel_images(first, True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    compiled_second = pixel_images(second, True)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile at the second boundary
    eager_second = pixel_images(second, False)
    assert torch.allclose(compiled_second, eager_second, atol=1e-4)
    assert not torch.allclose(compiled_second, compiled_first, atol=1e-2)


def test_a_fresh_generator_per_boundary_reuses_the_compiled_generator_and_teacher():
    """R-DFCIL trains a fresh generator every boundary: the second one runs the code compiled for the first."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    engine = GeneratorInversion(steps=2, batch_size=8, z_dim=16, keep_across_tasks=False, progress=False,
                                compile=True)
    engine.setup((1, 8, 8), RANGE)
    engine.synthesize(small_teacher(0, 2), [0, 1], 8)
    graphs = counters["stats"]["unique_graphs"]
    first_generator = engine.generator
    engine.synthesize(small_teacher(5, 4), [0, 1, 2, 3], 8)
    assert engine.generator is not first_generator
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_cuda_graph_mode_gives_the_eager_images():
    """`compile_mode: reduce-overhead` (CUDA graphs on a GPU; on a CPU Inductor's default code) changes no image."""
    teacher = small_teacher(0, 2)
    torch.manual_seed(1)
    engine = PixelInversion(steps=3, batch_size=8, lr=0.1, progress=False, compile=True, compile_mode="reduce-overhead")
    engine.setup((1, 8, 8), RANGE)
    graphed = engine.synthesize(teacher, [0, 1], 8)[0]
    assert torch.allclose(graphed, pixel_images(teacher, False), atol=1e-4)


def test_the_compiled_full_model_phase_of_per_layer_gives_the_eager_images():
    from cl_inversion.inversion import PerLayerInversion

    teacher = small_teacher(0, 2)

    def images(compile: bool) -> torch.Tensor:
        torch.manual_seed(1)
        engine = PerLayerInversion(layer_steps=0, full_steps=3, batch_size=8, progress=False, compile=compile)
        engine.setup((1, 8, 8), RANGE)
        engine.compile_now = compile
        start, targets = torch.randn(8, 1, 8, 8), torch.randn(8, teacher.backbone.feature_dim)
        return engine.invert_full(teacher, start, targets, torch.tensor([0, 1] * 4))

    assert torch.allclose(images(True), images(False), atol=1e-4)


def test_the_compiled_generator_steps_adam_fused_and_lands_where_eager_does():
    """Compiled, the generator's Adam runs its fused kernel for the synthesis only (flags restored after:
    checkpoints and eager runs keep the default update); the trained weights equal the eager ones."""

    def trained(compile: bool) -> GeneratorInversion:
        teacher = small_teacher(0, 2)
        torch.manual_seed(1)
        engine = GeneratorInversion(steps=3, batch_size=8, z_dim=16, progress=False, compile=compile)
        engine.setup((1, 8, 8), RANGE)
        engine.synthesize(teacher, [0, 1], 8)
        return engine

    compiled, eager = trained(True), trained(False)
    assert compiled.optimizer.param_groups[0]["fused"] is None and compiled.optimizer.param_groups[0]["foreach"] is None
    eager_weights = dict(eager.generator.named_parameters())
    for name, weight in compiled.generator.named_parameters():
        if weight.dim() > 1:  # biases feeding a BatchNorm have ~0 gradients: rounding noise that Adam normalises
            assert torch.allclose(weight, eager_weights[name], atol=1e-5), name


def test_a_run_records_what_auto_chose_at_each_boundary(compose, tmp_path):
    from cl_inversion.run import run

    cfg = compose(["method=deepinversion", "scenario.n_tasks=2", "trainer.max_epochs=1", "logger=none",
                   "trainer.enable_progress_bar=false", "inversion.n_images=20", "inversion.pixel.steps=3"])
    results = run(cfg, run_dir=tmp_path).to_dict()
    notes = results["inversion"][0]["notes"]
    assert any(note.startswith("pixel compile auto: off (3 steps of batch 20,") for note in notes), notes


def test_auto_stays_eager_where_inductor_has_no_compiler():
    import torch._inductor.config as inductor_config

    from cl_inversion.inversion.compiling import can_compile

    can_compile.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
            notes: list[str] = []
            assert not decide("auto", 10**9, 128, lambda: 1e9, CPU, notes, "generator")
            assert notes == ["generator compile auto: off (no compiler for torch.compile on cpu here)"]
    finally:
        can_compile.cache_clear()
    assert can_compile("cpu")


@pytest.mark.slow
def test_a_compiled_run_is_deterministic(compose, tmp_path):
    """Same config and seed, compiled synthesis: the same accuracy matrix and synthetic images."""
    from cl_inversion.run import run

    overrides = ["method=deepinversion", "scenario.n_tasks=2", "trainer.max_epochs=1", "logger=none",
                 "trainer.enable_progress_bar=false", "inversion.n_images=20", "inversion.pixel.steps=3",
                 "inversion.pixel.compile=true"]
    first = run(compose(overrides), run_dir=tmp_path / "a").to_dict()
    second = run(compose(overrides), run_dir=tmp_path / "b").to_dict()
    assert first["accuracy_matrix"] == second["accuracy_matrix"]
    assert first["inversion"][0]["bn_distance"] == second["inversion"][0]["bn_distance"]


def test_a_kept_generator_alternates_eager_and_compiled_boundaries():
    """ABD's generator and Adam kept across boundaries: eager, compiled (fused Adam), eager again all train, and
    Adam's step counts end where its default update keeps them (the host, the default dtype)."""
    engine = GeneratorInversion(steps=2, batch_size=8, z_dim=16, progress=False)
    engine.setup((1, 8, 8), RANGE)
    for compile in (False, True, False):
        engine.compile = compile
        engine.synthesize(small_teacher(0, 2), [0, 1], 8)
    steps = [state["step"] for state in engine.optimizer.state.values()]
    assert steps and all(float(s) == 6 and s.device.type == "cpu" and s.dtype == torch.float32 for s in steps)
    assert engine.optimizer.param_groups[0]["fused"] is None
