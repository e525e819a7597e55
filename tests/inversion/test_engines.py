"""Synthesis engines and the inversion callback: each loss term on tiny tensors, real runs on digits."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import run_in_process
from torch import nn

from cl_inversion.inversion import BNStatistics, GeneratorInversion, PerLayerInversion, PixelInversion, SynthesisError
from cl_inversion.inversion.callback import frechet_distance
from cl_inversion.inversion.common import balanced_labels, gaussian_blur, gaussian_kl, total_variation_l2
from cl_inversion.models import IncrementalClassifier, SmallCNN
from cl_inversion.utils.errors import ConfigError

PIXEL_RANGE = (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0))


def tiny_teacher(n_classes=4, seed=0):
    torch.manual_seed(seed)
    net = IncrementalClassifier(SmallCNN(1, width=8))
    net.head.grow(n_classes)
    net.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(5):
            net(torch.randn(64, 1, 8, 8) * 1.5 + 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def trained_teacher():
    """A small CNN trained on digits 0-3 (a few hundred SGD steps, ~2 s)."""
    from cl_inversion.data import digits

    bundle = digits()
    keep = bundle.train.targets < 4
    x = torch.stack([bundle.train[i][0] for i in keep.nonzero().flatten().tolist()])
    y = bundle.train.targets[keep]
    torch.manual_seed(0)
    net = IncrementalClassifier(SmallCNN(1, width=8))
    net.head.grow(4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(150):
        idx = torch.randint(len(y), (64,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def test_bn_hook_matches_hand_computation():
    bn = nn.BatchNorm2d(3)
    bn.running_mean = torch.tensor([0.5, -1.0, 0.0])
    bn.running_var = torch.tensor([1.0, 4.0, 0.25])
    bn.eval()
    x = torch.randn(16, 3, 5, 5) * 2 + 1
    with BNStatistics(nn.Sequential(bn)) as stats:
        bn(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        # KL(N(mu_r, s_r) || N(mu_b, s_b)) = log(s_b/s_r) + (s_r^2 + (mu_r - mu_b)^2) / (2 s_b^2) - 1/2
        kl = (torch.log(var.sqrt() / bn.running_var.sqrt())
              + (bn.running_var + (bn.running_mean - mean) ** 2) / (2 * var) - 0.5).mean()
        assert torch.allclose(stats.kl(), kl, atol=1e-5)
        di = torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(var - bn.running_var)
        assert torch.allclose(stats.norm_distance(first_multiplier=10.0), 10 * di, atol=1e-4)
    assert torch.allclose(gaussian_kl(torch.zeros(2), torch.ones(2), torch.zeros(2), torch.ones(2)), torch.zeros(2))


def test_first_bn_layer_is_weighted_and_sum_vs_mean():
    teacher = tiny_teacher()
    with BNStatistics(teacher) as stats:
        teacher(torch.randn(8, 1, 8, 8))
        assert len(stats) == 3
        per_layer = [torch.linalg.vector_norm(m - layer.running_mean) + torch.linalg.vector_norm(v - layer.running_var)
                     for layer, (m, v) in zip(stats.layers, stats.batch)]
        expected = 10 * per_layer[0] + per_layer[1] + per_layer[2]
        assert torch.allclose(stats.norm_distance(10.0), expected)
        assert torch.allclose(stats.kl("sum"), 3 * stats.kl("mean"))


def test_image_priors():
    flat = torch.ones(2, 1, 6, 6)
    assert total_variation_l2(flat) == 0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0
    # NVlabs' TV: 12 horizontal differences of 1 (norm √12), none vertical, 9 per diagonal (norm 3 each)
    assert total_variation_l2(stripes) == pytest.approx(12**0.5 + 6.0)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)  # a blur keeps constants
    noise = torch.randn(1, 3, 16, 16)
    assert gaussian_blur(noise).var() < noise.var()


def test_balanced_labels():
    labels = balanced_labels([0, 1, 2], 10)
    assert torch.bincount(labels).tolist() == [4, 3, 3]


def test_pixel_engine_reaches_its_targets_and_stays_in_range(trained_teacher):
    teacher = trained_teacher
    engine = PixelInversion(steps=60, batch_size=16, lr=0.25, bn_weight=0.1, progress=False)
    engine.setup((1, 8, 8), PIXEL_RANGE)
    images, labels = engine.synthesize(teacher, [0, 1, 2, 3], 24)
    assert images.shape == (24, 1, 8, 8) and torch.bincount(labels).tolist() == [6, 6, 6, 6]
    assert images.min() >= -1.0 and images.max() <= 2.0
    accuracy = (teacher(images).argmax(1) == labels).float().mean()
    assert accuracy >= 0.9
    assert engine.stats.full_model_passes == 2 * 60  # two chunks of 16 images
    assert engine.stats.curve and {"ce", "bn", "tv"} <= set(engine.stats.curve[-1])


def test_nan_loss_stops_synthesis_naming_engine_and_step():
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.head.slices[0].weight.fill_(float("nan"))
    engine = PixelInversion(steps=5, batch_size=8, progress=False)
    engine.setup((1, 8, 8), PIXEL_RANGE)
    with pytest.raises(SynthesisError, match="pixel synthesis: non-finite loss between steps 0 and 4"):
        engine.synthesize(teacher, [0, 1], 8)
    generator = GeneratorInversion(steps=5, batch_size=8, z_dim=16, progress=False, nan_retries=1)
    generator.setup((1, 8, 8), PIXEL_RANGE)
    with pytest.raises(SynthesisError, match="generator synthesis"):
        generator.synthesize(teacher, [0, 1], 8)
    assert any("NaN" in note for note in generator.stats.notes)  # it retried once before giving up


def test_generator_engine_trains_and_keeps_its_generator():
    teacher = tiny_teacher()
    engine = GeneratorInversion(steps=30, batch_size=32, z_dim=32, progress=False)
    engine.setup((1, 8, 8), PIXEL_RANGE)
    images, labels = engine.synthesize(teacher, [0, 1, 2, 3], 40)
    assert images.shape == (40, 1, 8, 8) and torch.bincount(labels, minlength=4).tolist() == [10, 10, 10, 10]
    first = engine.generator
    engine.synthesize(teacher, [0, 1, 2, 3], 8)
    assert engine.generator is first  # kept across tasks (ABD)
    replay = engine.replay(teacher, images, labels)
    x, y = replay.sample(5)
    assert x.shape == (5, 1, 8, 8) and torch.equal(y, teacher(x).argmax(1))


@pytest.mark.parametrize("seed", [0, 1])
def test_per_layer_engine_reduces_each_blocks_reconstruction_error(trained_teacher, seed):
    from cl_inversion.data import digits

    teacher = trained_teacher
    torch.manual_seed(seed)
    engine = PerLayerInversion(layer_steps=40, full_steps=20, batch_size=32, contrastive_epochs=5, progress=False)
    engine.setup((1, 8, 8), PIXEL_RANGE)
    bundle = digits()
    keep = (bundle.train.targets < 4).nonzero().flatten()[:128].tolist()
    real = [(torch.stack([bundle.train[i][0] for i in keep]), bundle.train.targets[keep])]
    engine.observe(teacher, real, None, None)
    images, labels = engine.synthesize(teacher, [0, 1, 2, 3], 32)
    assert len(engine.block_losses) == 3
    for first, best in engine.block_losses:
        assert best < first
    # a block step costs its FLOP share, a full step 1: total strictly between the two extremes
    assert 20 < engine.stats.full_model_passes < 20 + 40 * 3
    assert images.shape == (32, 1, 8, 8) and bool(torch.isin(labels, torch.arange(4)).all())


def test_per_layer_engine_without_per_layer_phase_starts_from_noise(trained_teacher):
    """layer_steps=0 is the ablation arm: full-model inversion (PMI's loss) from N(0, 1), no block steps."""
    torch.manual_seed(0)
    engine = PerLayerInversion(layer_steps=0, full_steps=5, batch_size=16, selection="random", progress=False)
    engine.setup((1, 8, 8), PIXEL_RANGE)
    engine.features.fit(torch.randn(40, trained_teacher.backbone.feature_dim), torch.arange(4).repeat(10))
    images, _ = engine.synthesize(trained_teacher, [0, 1, 2, 3], 16)
    assert engine.block_losses == [] and engine.stats.full_model_passes == 5
    assert images.shape == (16, 1, 8, 8)
    with pytest.raises(ConfigError, match="layer_steps=-1"):
        PerLayerInversion(layer_steps=-1)


def test_per_layer_observed_feature_targets_are_the_observed_features(trained_teacher):
    """feature_targets=observed: every target is one of the boundary's observed features of its class, each
    used once while they last; an unknown value is refused naming the field."""
    from cl_inversion.inversion.features import extract_features
    from cl_inversion.inversion.per_layer import observed_targets

    torch.manual_seed(0)
    real = [(torch.randn(12, 1, 8, 8), torch.tensor([0, 1, 2] * 4))]
    engine = PerLayerInversion(layer_steps=0, full_steps=1, batch_size=16, progress=False, feature_targets="observed",
                               contrastive_epochs=2)
    engine.setup((1, 8, 8), PIXEL_RANGE)
    engine.observe(trained_teacher, real, None, None)
    observed, observed_labels = extract_features(trained_teacher, real)
    assert torch.equal(engine.observed[0], observed) and torch.equal(engine.observed[1], observed_labels)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])  # class 1: 5 targets from 4 features, one twice
    targets = observed_targets(observed, observed_labels, labels)
    for c in (0, 1, 2):
        pool, mine = observed[observed_labels == c], targets[labels == c]
        matches = (mine[:, None, :] == pool[None]).all(-1)  # target i equals pool feature j
        assert bool(matches.any(1).all())
        assert matches.sum(0).max() == (1 if len(mine) <= len(pool) else 2)
    images, _ = engine.synthesize(trained_teacher, [0, 1, 2], 6)
    assert images.shape == (6, 1, 8, 8)
    with pytest.raises(ConfigError, match="feature_targets='real'"):
        PerLayerInversion(feature_targets="real")


def test_per_layer_old_classes_are_modelled_on_the_previous_pool_through_the_new_teacher(trained_teacher):
    """`update_buffer`: the new classes from real images, the old ones from the previous synthetic pool."""
    from cl_inversion.inversion.features import extract_features

    torch.manual_seed(0)
    real = [(torch.randn(10, 1, 8, 8), torch.tensor([2, 3] * 5))]
    pool_x, pool_y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1] * 4)
    engine = PerLayerInversion(contrastive_epochs=2, progress=False)
    engine.observe(trained_teacher, real, pool_x, pool_y)
    old, _ = extract_features(trained_teacher, [(pool_x, pool_y)])
    assert engine.features.gaussians.classes == [0, 1, 2, 3]
    assert torch.allclose(engine.features.gaussians.mean[0], old[pool_y == 0].mean(0), atol=1e-6)
    assert sorted(engine.features.encoders) == [0, 1, 2, 3]


def test_frechet_distance_zero_for_same_set_positive_for_shift():
    a = torch.randn(200, 3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2) == pytest.approx(12.0, rel=1e-3)


@pytest.mark.parametrize("method", ["deepinversion", "abd", "pmi"])
def test_inversion_methods_run_on_digits(tmp_path, method):
    res = run_in_process(
        f"method={method}", "scenario.n_tasks=3", "scenario.first_task_classes=4", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "inversion.n_images=40", "++inversion.pixel.steps=5",
        "++inversion.generator.steps=5", "++inversion.per_layer.layer_steps=3", "++inversion.per_layer.full_steps=3",
        run_dir=tmp_path)  # ++: a sweep's settings for every engine; the unused engines' are dropped
    assert res["status"] == "completed" and len(res["accuracy_matrix"]) == 3
    engine = {"deepinversion": "pixel", "abd": "generator", "pmi": "per_layer"}[method]
    assert [k for k, v in res["config"]["inversion"].items() if isinstance(v, dict)] == [engine]  # only its own
    inversion = res["inversion"]
    assert [r["task"] for r in inversion] == [0, 1]  # between tasks, not after the last one
    for record in inversion:
        for key in ("wall_s", "full_model_passes", "teacher_accuracy", "bn_distance", "feature_distance"):
            assert record[key] is not None and record[key] >= 0, key
        assert record["n_images"] == 40 and record["device"] == "cpu"  # the trainer's device
    assert res["carried_state_bytes"] > 0  # previous model + replay buffer or generator
    assert sorted(p.name for p in (tmp_path / "inversion").glob("*.png")) == ["task_0.png", "task_1.png"]
    metrics = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "inversion/teacher_accuracy" in metrics and "inversion_task_0/" in metrics
    ckpt = torch.load(tmp_path / "checkpoints" / "task_1.ckpt", weights_only=False)
    assert "InversionCallback" in ckpt["callbacks"]
    json.dumps(res)  # results stay plain JSON


def test_any_engine_pairs_with_any_student(cli, tmp_path):
    res = run_in_process("method=deepinversion", "method.inversion=generator", "scenario.n_tasks=2",
                         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "inversion.n_images=20",
                         "inversion.generator.steps=3", run_dir=tmp_path)
    assert res["inversion"][0]["engine"] == "generator"
    # on the command line: an engine that does not exist, or settings for another engine, are one error each
    bad = cli("method=abd", "method.inversion=dreams", run_dir=tmp_path / "bad", check=False)
    assert bad.returncode != 0 and "Could not find 'inversion/engine/dreams'" in bad.stderr
    assert "Available options in 'inversion/engine'" in bad.stderr and "Traceback" not in bad.stderr
    typo = cli("method=abd", "+inversion.generatr.steps=3", run_dir=tmp_path / "typo", check=False)
    assert typo.returncode == 2 and "inversion.generatr: not the run's engine (generator)" in typo.stderr


def test_per_layer_block_mse_is_checked():
    with pytest.raises(ValueError, match=r"inversion.per_layer.block_mse='l1': choose one of plain, relative"):
        PerLayerInversion(block_mse="l1")
