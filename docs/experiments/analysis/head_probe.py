"""Evaluation-only probe of a run's final checkpoint: retrain only the head on the frozen final features.

    python docs/experiments/analysis/head_probe.py <run dir> [<run dir> ...]

* `balancing`: what a data-free student has at the end — real training data of the last task and the last
  boundary's synthetic set — class-weighted CE (R-DFCIL's weights), SGD at two learning rates and two lengths
  (48 steps = the CIFAR-10 copy's balancing phase);
* the same with the synthetic set crop-and-flipped 8 times;
* `oracle`: real training data of every task (what no data-free method has): how much of the old classes
  the features still separate linearly.
Prints test accuracy over all seen classes (10k images on the CIFAR-10 copy) for each head.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cl_inversion.inversion.callback import InversionCallback
from cl_inversion.loop.checkpoints import load_resume_state, restore
from cl_inversion.loop.task_loop import TaskLoop
from cl_inversion.methods.inversion_student import crop_flip_batch


@torch.no_grad()
def features(net, batches):
    fs, ys = [], []
    for x, y in batches:
        fs.append(net.features(x))
        ys.append(y)
    return torch.cat(fs), torch.cat(ys)


def fit_head(w0, b0, f, y, n_classes, lr, steps, batch=256):
    """SGD (momentum 0.9) on the head alone from its final weights, class-weighted CE."""
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True) if b0 is not None else None
    counts = torch.bincount(y, minlength=n_classes).float()
    weights = counts.sum() / counts.clamp(min=1)
    weights = weights / weights.min()
    opt = torch.optim.SGD([p for p in (w, b) if p is not None], lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,))
        logits = f[idx] @ w.T + (b if b is not None else 0)
        loss = F.cross_entropy(logits, y[idx], weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach() if b is not None else None


def accuracy(w, b, f, y) -> float:
    return 100 * float(((f @ w.T + (b if b is not None else 0)).argmax(1) == y).float().mean())


def probe(run: Path) -> None:
    torch.manual_seed(0)
    loop = TaskLoop(OmegaConf.load(run / ".hydra" / "config.yaml"), run)
    loop.build()
    state, _ = load_resume_state(sorted((run / "checkpoints").glob("task_*.ckpt"))[-1])
    restore(loop.method, state, loop.callbacks)
    t, net, n = state["task"], loop.method.net.eval(), loop.method.n_seen
    modules = [loop.scenario.datamodule(j, 256, 0, cumulative=False, seed=0) for j in range(t + 1)]
    test_f, test_y = features(net, [b for j, dm in enumerate(modules) for b in dm.test_dataloaders()[j]])
    w0 = net.head.weight.detach()[:n].clone()
    b0 = net.head.bias.detach()[:n].clone() if net.head.bias is not None else None
    print(f"{run.name}: final head {accuracy(w0, b0, test_f, test_y):.2f}", flush=True)
    real_f, real_y = features(net, modules[t].plain_train_dataloader())
    synthetic = next(c for c in loop.callbacks if isinstance(c, InversionCallback))
    images, labels = synthetic.images, synthetic.labels
    syn_f, _ = features(net, [(images[i : i + 256], labels[i : i + 256]) for i in range(0, len(labels), 256)])
    f, y = torch.cat([real_f, syn_f]), torch.cat([real_y, labels])
    for lr, steps in ((0.005, 48), (0.005, 500), (0.05, 48), (0.05, 500)):
        w, b = fit_head(w0, b0, f, y, n, lr, steps)
        print(f"  balancing head (last task's real data + {len(labels)} synthetic), lr {lr}, {steps} steps: "
              f"{accuracy(w, b, test_f, test_y):.2f}", flush=True)
    augmented = torch.cat([crop_flip_batch(images, max(1, images.shape[-1] // 8)) for _ in range(8)])
    aug_f, _ = features(net, [(augmented[i : i + 256], labels[:1]) for i in range(0, len(augmented), 256)])
    fa, ya = torch.cat([real_f, aug_f]), torch.cat([real_y, labels.repeat(8)])
    for lr, steps in ((0.005, 48), (0.05, 500)):
        w, b = fit_head(w0, b0, fa, ya, n, lr, steps)
        print(f"  balancing head, synthetic x8 crop+flip, lr {lr}, {steps} steps: {accuracy(w, b, test_f, test_y):.2f}",
              flush=True)
    all_f, all_y = features(net, [b for dm in modules for b in dm.plain_train_dataloader()])
    w, b = fit_head(w0, b0, all_f, all_y, n, 0.05, 1000)
    print(f"  oracle head (real data of every task), lr 0.05, 1000 steps: {accuracy(w, b, test_f, test_y):.2f}",
          flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        probe(Path(path))
