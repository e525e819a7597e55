"""The synthesis hot loop: one-pass BN statistics equal the two-pass ones, no host read of a loss between
log points, and the speed options (bf16 autocast, channels-last) run correctly on a CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from cl_inversion.inversion import GeneratorInversion, PerLayerInversion, PixelInversion
from cl_inversion.inversion.common import BNStatistics, batch_moments
from cl_inversion.models import CifarResNet, IncrementalClassifier, SmallCNN
from cl_inversion.utils.errors import ConfigError

PIXEL_RANGE = (torch.full((3, 1, 1), -2.0), torch.full((3, 1, 1), 2.0))


def teacher(n_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = IncrementalClassifier(CifarResNet(32, in_channels=3, width=4))
    net.head.grow(n_classes)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 3, 8, 8) * 1.5 + 0.3)
    return net.eval()


def test_one_pass_bn_moments_equal_the_two_pass_ones():
    torch.manual_seed(0)
    for shape, scale, offset in (((64, 16, 8, 8), 1.0, 0.0), ((256, 8, 4, 4), 3.0, 5.0), ((32, 10), 0.1, -2.0)):
        x = torch.randn(shape) * scale + offset
        dims = [0] + list(range(2, x.dim()))
        # the shift is what a BN layer's running mean is: near the batch mean, not equal to it
        running_mean = x.mean(dims) + 0.3 * scale * torch.randn(shape[1])
        mean, var = batch_moments(x, running_mean)
        assert torch.allclose(mean, x.mean(dims), rtol=1e-5, atol=1e-6)
        assert torch.allclose(var, x.var(dims, unbiased=False), rtol=1e-5)
        bf16_mean, bf16_var = batch_moments(x.bfloat16(), running_mean)  # accumulated in fp32 whatever the input
        assert bf16_mean.dtype == bf16_var.dtype == torch.float32
    x = torch.randn(64, 16, 8, 8)  # unshifted: fine when |mean| is not large against std
    assert torch.allclose(batch_moments(x)[1], x.var([0, 2, 3], unbiased=False), rtol=1e-5)

    bn = nn.BatchNorm2d(8).eval()  # the hook shifts by the layer's running mean
    bn.running_mean.fill_(-2.0)
    stats = BNStatistics(bn)
    x = torch.randn(32, 8, 4, 4) * 0.1 - 2.0
    bn(x)
    mean, var = stats.batch[0]
    assert torch.allclose(var, x.var([0, 2, 3], unbiased=False), rtol=1e-5)
    stats.remove()


class HostReads:
    """Counts reads of floating-point tensor values back to Python (`.item()`, `float()`, `.tolist()`).

    Reads made inside `torch.optim` are not counted: Adam keeps its step counter as a host (CPU) tensor
    whatever the parameters' device, so reading it never waits for an accelerator."""

    def __init__(self) -> None:
        self.count = 0
        self.saved = {}

    def __enter__(self) -> HostReads:
        for name in ("item", "__float__", "tolist"):
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def counting(t, *args, _original=original, **kwargs):
                caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
                if t.is_floating_point() and "/torch/optim/" not in caller:
                    self.count += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counting)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("engine", ["pixel", "generator", "per_layer"])
def test_step_loops_read_the_loss_only_at_log_points(engine):
    net = teacher()
    steps, log_every = 40, 10
    if engine == "pixel":
        e = PixelInversion(steps=steps, batch_size=16, progress=False, log_every=log_every)
    elif engine == "generator":
        e = GeneratorInversion(steps=steps, batch_size=16, z_dim=16, progress=False, log_every=log_every)
    else:
        e = PerLayerInversion(layer_steps=0, full_steps=steps, batch_size=16, progress=False, log_every=log_every)
    e.setup((3, 8, 8), PIXEL_RANGE)
    with HostReads() as reads:
        if engine == "generator":
            e._fresh_generator(torch.device("cpu"), e.lr)
            e._train(net, 4)
        elif engine == "pixel":
            with BNStatistics(net) as bn:
                e._run(net, bn, torch.arange(4).repeat(4), e.lr, 0)
        else:
            e.invert_full(net, torch.zeros(16, 3, 8, 8), torch.randn(16, net.backbone.feature_dim),
                          torch.arange(4).repeat(4))
    assert reads.count <= steps // log_every, reads.count  # one read per log point (NaN flag + terms together)
    assert len(e.stats.curve) == steps // log_every


def pixel_images(precision: str, channels_last: bool, bn_weight: float = 0.0):
    net = teacher()
    torch.manual_seed(1)
    e = PixelInversion(steps=30, batch_size=16, lr=0.1, progress=False, precision=precision,
                       channels_last=channels_last, bn_weight=bn_weight, tv_weight=0.0, log_every=1)
    e.setup((3, 8, 8), PIXEL_RANGE)
    images, labels = e.synthesize(net, [0, 1, 2, 3], 16)
    return net, images, labels, [row["ce"] for row in e.stats.curve]


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_precision_and_channels_last_run_and_invert(precision, channels_last):
    net, images, labels, ce = pixel_images(precision, channels_last)
    assert torch.isfinite(images).all() and images.dtype == torch.float32
    assert ce[-1] < 0.5 * ce[0]  # the cross-entropy to the targets falls: the images are being inverted
    if precision != "32":  # bf16 gets about as far as fp32 does in the same steps
        assert ce[-1] < 2.0 * pixel_images("32", channels_last)[3][-1]
    assert net.backbone.stem[0].weight.is_contiguous()  # the teacher's layout is restored
    if precision == "32" and channels_last:  # the same arithmetic in another layout: the same images
        _, contiguous, _, _ = pixel_images("32", False)
        assert torch.allclose(images, contiguous, atol=1e-3)
    g = GeneratorInversion(steps=3, batch_size=8, z_dim=16, progress=False, precision=precision,
                           channels_last=channels_last)
    g.setup((3, 8, 8), PIXEL_RANGE)
    images, _ = g.synthesize(net, [0, 1, 2, 3], 8)
    assert torch.isfinite(images).all()
    assert g.generator.block1[0].weight.is_contiguous()  # the generator's layout is restored too


def test_unknown_precision_is_rejected_with_the_field():
    with pytest.raises(ConfigError, match="inversion.pixel.precision='16'.*32, bf16-mixed"):
        PixelInversion(precision="16")
    with pytest.raises(ConfigError, match="inversion.generator.precision"):
        GeneratorInversion(precision="fp8")


def test_small_cnn_teacher_also_runs_bf16():
    torch.manual_seed(0)
    net = IncrementalClassifier(SmallCNN(1, width=8))
    net.head.grow(2)
    net.eval()
    e = PixelInversion(steps=3, batch_size=8, progress=False, precision="bf16-mixed")
    e.setup((1, 8, 8), (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0)))
    images, _ = e.synthesize(net, [0, 1], 8)
    assert torch.isfinite(images).all()


@pytest.mark.slow
def test_compiled_teacher_gives_the_images_of_the_eager_one():
    def images(compile_teacher: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = IncrementalClassifier(SmallCNN(1, width=4))
        net.head.grow(2)
        net.eval()
        torch.manual_seed(1)
        e = PixelInversion(steps=3, batch_size=8, lr=0.1, progress=False, compile=compile_teacher)
        e.setup((1, 8, 8), (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0)))
        return e.synthesize(net, [0, 1], 8)[0]

    assert torch.allclose(images(True), images(False), atol=1e-4)


def test_off_a_terminal_synthesis_progress_is_log_lines(caplog):
    import logging

    net = teacher()
    e = PixelInversion(steps=20, batch_size=8, progress=True, log_every=5)  # pytest's stderr is no terminal
    e.setup((3, 8, 8), PIXEL_RANGE)
    with caplog.at_level(logging.INFO, logger="cl_inversion"):
        e.synthesize(net, [0, 1], 8)
    lines = [r.getMessage() for r in caplog.records if "DeepInversion batch 0" in r.getMessage()]
    assert lines and lines[-1].startswith("DeepInversion batch 0: step 20/20 | loss ")
    assert len(lines) <= 2  # a short synthesis: the last line (and one per minute for long ones)


def generator_first_step_gradients(**options) -> list[torch.Tensor]:
    """The gradients one generator step leaves, from fixed weights and latents."""
    from cl_inversion.inversion import GeneratorInversion

    torch.manual_seed(0)
    net = IncrementalClassifier(SmallCNN(1, width=4))
    net.head.grow(2)
    net.eval()
    torch.manual_seed(1)
    e = GeneratorInversion(steps=1, batch_size=8, z_dim=16, progress=False, **options)
    e.setup((1, 8, 8), (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0)))
    e.synthesize(net, [0, 1], 8)
    return [p.grad.clone() for p in e.generator.parameters()]


def assert_same_gradients(option: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    scale = max(g.abs().max().item() for g in eager)  # l1.bias feeds a BN: its gradient is ~0, all noise
    for option_g, eager_g in zip(option, eager, strict=True):
        assert torch.allclose(option_g, eager_g, rtol=1e-3, atol=1e-4 * scale)


def test_channels_last_generator_step_gives_the_gradients_of_the_contiguous_one():
    assert_same_gradients(generator_first_step_gradients(channels_last=True), generator_first_step_gradients())


@pytest.mark.slow
def test_compiled_generator_step_gives_the_gradients_of_the_eager_one():
    assert_same_gradients(generator_first_step_gradients(compile=True), generator_first_step_gradients())
