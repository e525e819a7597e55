"""Elastic Weight Consolidation (Kirkpatrick et al. 2017): the L2 penalty weighted by a diagonal Fisher.

Reference: GT-RIPL/Continual-Learning-Benchmark, `agents/regularization.py` (classes `EWC` and
`EWC_online`). As there:

* the Fisher uses the model's own predicted labels (argmax over the seen classes), not the true ones
  (`empFI` False);
* it is accumulated from mini-batch gradients over the task's whole training loader: for each batch,
  the gradient of the batch-mean cross-entropy, squared, times the batch size, divided by the number of
  batches; network in eval mode (`calculate_importance`). With `fisher_samples` set, a random subset of
  that many images is used one at a time instead (the reference's `n_fisher_sample`);
* one anchor and one Fisher per task, the penalties summed (`online_reg` False); `online: true` is
  `EWC_online`: one slot with the latest weights and the Fishers of all tasks summed;
* all parameters (head included), `reg_coef` times the sum.

Difference: the Fisher's loader is the task's plain training images (no augmentation, no shuffling);
the reference iterates its training loader (augmented). Batches come from `dataset.batch_size`.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from cl_inversion.methods.l2 import L2
from cl_inversion.utils.nn_utils import eval_mode


class EWC(L2):
    default_online = False
    accumulates_online = True

    def __init__(self, *args, reg_coef: float = 100.0, fisher_samples: int | None = None, **kwargs) -> None:
        super().__init__(*args, reg_coef=reg_coef, **kwargs)
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(f"method.fisher_samples={fisher_samples} must be >= 1 or null (whole loader)")
        self.fisher_samples = fisher_samples

    def fisher_loader(self, datamodule: L.LightningDataModule) -> DataLoader:
        loader = datamodule.plain_train_dataloader()
        if self.fisher_samples is None:
            return loader
        dataset = loader.dataset
        n = min(self.fisher_samples, len(dataset))
        picked = torch.randperm(len(dataset))[:n].tolist()
        return DataLoader(Subset(dataset, picked), batch_size=1, shuffle=False)

    def task_importance(self, datamodule: L.LightningDataModule) -> dict[str, Tensor]:
        """Σ_batches (∂ CE(f(x)[:, :seen], argmax f(x)) / ∂θ)² · |batch| / n_batches."""
        params = self.regularised_parameters()
        fisher = {n: torch.zeros_like(p).detach() for n, p in params.items()}
        loader = self.fisher_loader(datamodule)
        n_batches = len(loader)
        with eval_mode(self.net):
            for x, _ in loader:
                logits = self.net(x.to(self.device))[:, : self.n_seen]
                predicted = logits.argmax(1).detach()
                grads = torch.autograd.grad(F.cross_entropy(logits, predicted), list(params.values()),
                                            allow_unused=True)
                for name, g in zip(params, grads):
                    if g is not None:
                        fisher[name] += g.detach() ** 2 * len(x) / n_batches
        return fisher
