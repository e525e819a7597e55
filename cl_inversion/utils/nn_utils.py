"""Small module-state helpers every part of the package uses (one place for each idea)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(module: nn.Module) -> bool:
    """Whether BN-statistics terms apply (ViTs have no BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (BN uses running statistics, no dropout) for the block, then back to the mode
    it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextmanager
def frozen_eval(net: nn.Module) -> Iterator[nn.Module]:
    """Teacher mode: eval, and no parameter gradients; both restored afterwards."""
    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    try:
        with eval_mode(net):
            yield net
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
