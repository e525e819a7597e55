"""What a method replays during the next task: a fixed buffer, or fresh samples from a generator."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BufferReplay(nn.Module):
    """A fixed set of synthetic images (DeepInversion, PMI): random mini-batches from it, drawn with replacement,
    or without within a batch (`replacement=False`: PMI's `ClassWiseContrastiveBuffer.get_data`)."""

    def __init__(self, images: Tensor, labels: Tensor, replacement: bool = True) -> None:
        super().__init__()
        self.replacement = replacement
        self.register_buffer("images", images.detach().cpu())
        self.register_buffer("labels", labels.detach().cpu().long())

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        if self.replacement or n > len(self.labels):
            index = torch.randint(len(self.labels), (n,), device=self.labels.device)
        else:
            index = torch.randperm(len(self.labels), device=self.labels.device)[:n]
        return self.images[index], self.labels[index]


class GeneratorReplay(nn.Module):
    """Fresh images from a trained generator each step, labelled by the frozen teacher (ABD)."""

    def __init__(self, generator: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.teacher = teacher
        self.requires_grad_(False)

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        self.generator.eval()
        self.teacher.eval()
        images = self.generator.sample(n)
        return images, self.teacher(images).argmax(1)
