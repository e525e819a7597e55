"""PMI's claim, measured: per-layer inversion as the initialisation of full-model inversion reaches
DeepInversion's end quality in far fewer full-model passes.

On one frozen teacher (trained here), synthesise the same images with (a) DeepInversion from noise
and (b) per-layer init + full-model inversion, side by side in one process. Quality target =
DeepInversion's own end quality: teacher accuracy on the batch (≥) and BN distance (≤; ViTs have no BN,
so accuracy alone). For each: full-model passes (per-layer steps at their FLOP share) and wall time
until the target is first met (quality checks are not timed). Two ablations on the same feature targets
and budget say what the per-layer phase itself buys: PMI's full-model inversion from noise, and from real
test images (a bound on any initialisation). Last output line: one JSON object.

    python -m benchmarks.inversion_speed [--quick] [--dataset digits|cifar10] [--backbone clip_tiny]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate

from cl_inversion.inversion import BNStatistics
from cl_inversion.inversion.common import balanced_labels, frozen_eval
from cl_inversion.models import IncrementalClassifier
from cl_inversion.run import build_dataset, compose

SETTINGS = {  # dataset -> (overrides, teacher epochs, teacher subset)
    "digits": (["dataset=digits", "backbone=small_cnn"], 15, None),
    "cifar10": (["dataset=imagefolder", "backbone=resnet32"], 15, 10000),  # quick: 7 epochs on 5000 images
}


def train_teacher(cfg, bundle, epochs: int, subset: int | None, quick: bool) -> IncrementalClassifier:
    torch.manual_seed(0)
    net = IncrementalClassifier(instantiate(cfg.backbone))
    net.grow(bundle.num_classes) if hasattr(net, "grow") else net.head.grow(bundle.num_classes)
    n = len(bundle.train) if subset is None else min(subset // (2 if quick else 1), len(bundle.train))
    index = torch.randperm(len(bundle.train))[:n]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(bundle.train, index.tolist()), batch_size=128,
                                         shuffle=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * len(loader))
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval().requires_grad_(False)
    return net


@torch.no_grad()
def quality(teacher, images, labels) -> dict[str, float | None]:
    with frozen_eval(teacher), BNStatistics(teacher) as bn:
        accuracy = 100.0 * float((teacher(images).argmax(1) == labels).float().mean())
        return {"teacher_accuracy": accuracy, "bn_distance": float(bn.kl()) if len(bn) else None}


class Watch:
    """Step hook: records quality every `every` steps with the clock stopped while it checks."""

    def __init__(self, teacher, labels, engine, every: int, target: dict | None = None) -> None:
        self.teacher, self.labels, self.engine, self.every, self.target = teacher, labels, engine, every, target
        self.paused = 0.0
        self.started = time.perf_counter()
        self.reached: dict[str, Any] | None = None  # both criteria
        self.reached_accuracy: dict[str, Any] | None = None
        self.curve: list[dict[str, Any]] = []
        self.start_images: torch.Tensor | None = None

    def meets(self, q: dict, accuracy_only: bool = False) -> bool:
        t = self.target
        ok = q["teacher_accuracy"] >= t["teacher_accuracy"]
        if not accuracy_only and t["bn_distance"] is not None and q["bn_distance"] is not None:
            ok = ok and q["bn_distance"] <= t["bn_distance"]
        return ok

    def __call__(self, images, step: int) -> None:
        if (step + 1) % self.every:
            return
        pause = time.perf_counter()
        if step < 0:
            self.start_images = images.clone()  # the engine updates its tensor in place
        q = quality(self.teacher, images, self.labels)
        point = {"step": step + 1, "passes": self.engine.stats.full_model_passes,
                 "wall_s": pause - self.started - self.paused, **q}
        self.curve.append(point)
        if self.target is not None and self.reached is None and self.meets(q):
            self.reached = point
        if self.target is not None and self.reached_accuracy is None and self.meets(q, accuracy_only=True):
            self.reached_accuracy = point
        self.paused += time.perf_counter() - pause


def summary(point: dict | None) -> dict | None:
    return None if point is None else {k: point[k] for k in ("step", "passes", "wall_s", "teacher_accuracy",
                                                             "bn_distance")}


def arm(teacher, watch: Watch, targets, reached_di: dict, reached_di_accuracy: dict) -> dict[str, Any]:
    """One ablation arm: where it first meets the target (both criteria / accuracy alone), its start and end,
    speedups."""
    both, accuracy = watch.reached, watch.reached_accuracy
    return {"reached": summary(both), "reached_accuracy_only": summary(accuracy), "start": summary(watch.curve[0]),
            "start_feature_error": feature_error(teacher, watch.start_images, targets),
            "end": summary(watch.curve[-1]),
            "speedup_passes": speedup(reached_di, both, "passes"),
            "speedup_passes_accuracy": speedup(reached_di_accuracy, accuracy, "passes")}


@torch.no_grad()
def feature_error(teacher, images, targets) -> float:
    """Relative squared error of the images' features to their target features (1 = as far as zero)."""
    with frozen_eval(teacher):
        return float((teacher.features(images) - targets).pow(2).mean() / targets.pow(2).mean())


def speedup(reference: dict, point: dict | None, key: str) -> float | None:
    """reference / point; None when the point never met the target, or met it at the start (zero cost)."""
    return None if point is None or not point[key] else reference[key] / point[key]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets (under 10 minutes on 2 cores)")
    parser.add_argument("--dataset", choices=sorted(SETTINGS), default="digits")
    parser.add_argument("--backbone", default=None, help="override the backbone config (e.g. clip_tiny)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="print the quality curves")
    parser.add_argument("--pmi-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a per_layer engine setting of the dataset's config (repeatable), "
                             "e.g. --pmi-set full_steps=60 --pmi-set bn_loss=norm")
    args = parser.parse_args(argv)

    overrides, epochs, subset = SETTINGS[args.dataset]
    if args.backbone:
        overrides = [o for o in overrides if not o.startswith("backbone=")] + [f"backbone={args.backbone}"]
    cfg = compose(overrides)
    bundle = build_dataset(cfg)
    began = time.perf_counter()
    teacher = train_teacher(cfg, bundle, epochs if not args.quick else max(2, epochs // 2), subset, args.quick)
    teacher_s = time.perf_counter() - began
    n = args.images or (128 if args.quick else 256)
    classes = list(range(bundle.num_classes))
    labels = balanced_labels(classes, n)
    pixel_range = bundle.pixel_range()
    di_steps = 400 if args.quick else 2000
    every = 5

    torch.manual_seed(1)
    # both engines as the framework builds them for this dataset (conf/inversion + conf/budget), same batch
    di = instantiate(cfg.inversion.pixel, steps=di_steps, batch_size=n, progress=False)
    di.setup(bundle.image_shape, pixel_range)
    watch_di = Watch(teacher, labels, di, every)
    di.step_hook = watch_di
    images, _ = di.synthesize(teacher, classes, n)
    target = quality(teacher, images, labels)
    # for scale: the same measures on a batch of real test images
    pick = torch.randperm(len(bundle.test), generator=torch.Generator().manual_seed(0))[:n].tolist()
    real_quality = quality(teacher, torch.stack([bundle.test[i][0] for i in pick]), bundle.test.targets[pick])
    watch_di.target = target
    reached_di = next(p for p in watch_di.curve if watch_di.meets(p))
    reached_di_accuracy = next(p for p in watch_di.curve if watch_di.meets(p, accuracy_only=True))

    pmi_args = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.pmi_set)}
    train_sample = [(bundle.train[i][0][None], bundle.train.targets[i : i + 1])
                    for i in range(0, len(bundle.train), 7)]
    train_sample = [(torch.cat([x for x, _ in train_sample]), torch.cat([y for _, y in train_sample]))]

    def pmi_engine(fitted=None, **overrides):
        """A per-layer engine; its task-boundary feature model fitted (timed) or shared with `fitted`."""
        engine = instantiate(cfg.inversion.per_layer, batch_size=n, progress=False, **{**pmi_args, **overrides})
        engine.setup(bundle.image_shape, pixel_range)
        began = time.perf_counter()
        if fitted is None:
            engine.observe(teacher, train_sample, None, None)
        else:
            engine.gaussians, engine.selector = fitted.gaussians, fitted.selector
        return engine, time.perf_counter() - began

    torch.manual_seed(1)
    pmi, feature_model_s = pmi_engine()  # the boundary's Gaussians + selector: reported, not counted
    after_fit = torch.get_rng_state()  # the ablations restart here: the same sampled feature targets
    watch_pmi = Watch(teacher, labels, pmi, every, target)
    pmi.step_hook = watch_pmi
    pmi.synthesize(teacher, classes, n)
    reached_pmi, reached_pmi_accuracy = watch_pmi.reached, watch_pmi.reached_accuracy

    # Ablations, same targets and budget: what the per-layer phase itself buys.
    # (1) PMI's full-model inversion from noise (layer_steps=0);
    torch.set_rng_state(after_fit)
    no_layers, _ = pmi_engine(pmi, layer_steps=0)
    watch_no_layers = Watch(teacher, labels, no_layers, every, target)
    no_layers.step_hook = watch_no_layers
    no_layers.synthesize(teacher, classes, n)
    if not torch.equal(no_layers.last_targets, pmi.last_targets):
        raise RuntimeError("ablation without the per-layer phase sampled other feature targets than PMI")
    # (2) the same from real test images of the same labels: a bound on what any initialisation can buy.
    torch.set_rng_state(after_fit)
    from_real, _ = pmi_engine(pmi)
    by_class = {c: (bundle.test.targets == c).nonzero().flatten().tolist() for c in classes}
    real_init = torch.stack([bundle.test[by_class[int(c)].pop(0)][0] for c in labels])
    watch_real = Watch(teacher, labels, from_real, every, target)
    from_real.step_hook = watch_real
    with frozen_eval(teacher):
        from_real.invert_full(teacher, real_init, pmi.last_targets, labels)

    result = {
        "dataset": args.dataset, "backbone": cfg.backbone._target_.rsplit(".", 1)[-1] if not args.backbone
        else args.backbone, "n_images": n, "quick": args.quick, "teacher_train_s": teacher_s,
        "target": target, "deepinversion": summary(reached_di),
        "pmi": summary(reached_pmi), "pmi_end": summary(watch_pmi.curve[-1]),
        "pmi_start": summary(watch_pmi.curve[0]),  # the per-layer image, before any full-model step
        # how far the per-layer chain carries the target back: each block's relative reconstruction error
        # (first step, last step; stem first) and the per-layer image's features vs their targets
        "pmi_block_relative_errors": pmi.block_losses,
        "pmi_start_feature_error": feature_error(teacher, watch_pmi.start_images, pmi.last_targets),
        "pmi_per_layer_passes": pmi.stats.full_model_passes - pmi.full_steps,
        "pmi_feature_model_s": feature_model_s,
        "real_batch": real_quality,
        # equal quality = both criteria; null when PMI's budget never reaches it
        "speedup_passes": speedup(reached_di, reached_pmi, "passes"),
        "speedup_wall": speedup(reached_di, reached_pmi, "wall_s"),
        # teacher accuracy alone (the criterion that applies to ViTs, which have no BN statistics)
        "deepinversion_accuracy_only": summary(reached_di_accuracy),
        "pmi_accuracy_only": summary(reached_pmi_accuracy),
        "speedup_passes_accuracy": speedup(reached_di_accuracy, reached_pmi_accuracy, "passes"),
        "speedup_wall_accuracy": speedup(reached_di_accuracy, reached_pmi_accuracy, "wall_s"),
    }
    result["ablations"] = {name: arm(teacher, watch, pmi.last_targets, reached_di, reached_di_accuracy)
                           for name, watch in (("pmi_without_per_layer", watch_no_layers),
                                               ("pmi_from_real_images", watch_real))}
    if args.verbose:
        for name, watch in (("deepinversion", watch_di), ("pmi", watch_pmi), ("without_per_layer", watch_no_layers),
                            ("from_real_images", watch_real)):
            for point in watch.curve[:: max(1, len(watch.curve) // 8)]:
                print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
