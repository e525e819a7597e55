"""Elastic Weight Consolidation (Kirkpatrick et al. 2017): the L2 penalty weighted by the diagonal
empirical Fisher information, summed over tasks."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from cl_inversion.methods.l2 import L2


class EWC(L2):
    accumulates = True

    def __init__(self, *args, reg_coef: float = 100.0, fisher_samples: int = 512, **kwargs) -> None:
        super().__init__(*args, reg_coef=reg_coef, **kwargs)
        self.fisher_samples = fisher_samples

    def task_importance(self, datamodule: L.LightningDataModule) -> dict[str, Tensor]:
        """Mean squared gradient of the log-likelihood of the true label, one sample at a time."""
        params = dict(self.net.backbone.named_parameters())
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = self.net.training
        self.net.eval()
        seen = 0
        for x, y in datamodule.plain_train_dataloader():
            for xi, yi in zip(x.to(self.device), y.to(self.device)):
                self.net.zero_grad()
                F.cross_entropy(self.net(xi[None])[:, : self.n_seen], yi[None]).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach() ** 2
                seen += 1
                if seen >= self.fisher_samples:
                    break
            if seen >= self.fisher_samples:
                break
        self.net.zero_grad()
        self.net.train(was_training)
        return {n: f / max(seen, 1) for n, f in fisher.items()}
