"""PMI's speed claim, measured: does per-layer inversion, as the initialisation of a short full-model
inversion, reach DeepInversion's end quality in fewer full-model passes?

On one frozen teacher (trained here: a CNN, or with `--teacher vit` a small open_clip ViT image tower)
the same number of images is synthesised, one arm after the other in one process, by (a) DeepInversion
from noise, (b) PMI (per-layer init + full-model inversion), and two ablations on PMI's feature targets
and budget: PMI's full-model inversion from noise (no per-layer phase) and from real test images (a
bound on any initialisation).

Criterion = what replay needs, both at least as good as DeepInversion's END values:
  - teacher top-1 accuracy on the synthetic set vs its intended labels (>=), and
  - Fréchet distance between the teacher's penultimate features of the synthetic set and of real
    training images of the same classes (<=; a sample disjoint from the one PMI fits its Gaussians on).
BN distance is recorded as a diagnostic only. Each arm is measured every few steps with the clock
stopped; its cost to the criterion is full-model passes (per-layer steps at their FLOP share) and wall
time. Decisive figure: data-free distillation accuracy — a fresh student of the teacher's architecture
trained for a fixed short budget only on an arm's images with the teacher's soft labels (KD), evaluated
on real test images — at each arm's end and at the point where it first meets the criterion.
Last output line: one JSON object.

    python -m benchmarks.inversion_speed [--quick] [--dataset digits|cifar10] [--teacher cnn|vit]

`--vit-per-layer add|only` (ViT teacher): also (or only) PMI's CLIP per-block inversion, the `vit_per_layer`
engine (data statistics, `start_block`, ...; `--vit-set key=value` overrides its settings) run on the same
teacher: its per-block reconstruction errors and seconds of synthesis per class, under the key `vit_per_layer`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate

from cl_inversion.data.datasets import crop_flip
from cl_inversion.inversion import BNStatistics
from cl_inversion.inversion.callback import batched_features, frechet_distance
from cl_inversion.inversion.common import balanced_labels, frozen_eval, jitter_flip
from cl_inversion.models import IncrementalClassifier
from cl_inversion.run import build_dataset, compose

# (dataset, teacher) -> config overrides and budgets. `epochs`/`subset`: the teacher's training (quick:
# `quick_epochs`, half the subset); `di_steps`: DeepInversion's schedule (quick, full); `images`: the
# synthetic set (quick, full); `distill`: the students' steps (quick, full); `crop_padding`: the teacher's
# random-crop padding as a share of the image side (None: the dataset's own augmentation, 4 px).
SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("digits", "cnn"): {"overrides": ["dataset=digits", "backbone=small_cnn"], "epochs": 15, "quick_epochs": 7,
                        "subset": None, "optimizer": "sgd", "di_steps": (400, 2000), "images": (256, 512),
                        "distill": (300, 600)},
    ("cifar10", "cnn"): {"overrides": ["dataset=imagefolder", "backbone=resnet32"], "epochs": 15,
                         "quick_epochs": 7, "subset": 10000, "optimizer": "sgd", "di_steps": (400, 2000),
                         "images": (128, 256), "distill": (100, 500)},
    ("cifar10", "vit"): {"overrides": ["dataset=imagefolder", "backbone=clip_small"], "epochs": 8,
                         "quick_epochs": 7, "subset": None, "optimizer": "adamw", "di_steps": (300, 2000),
                         "images": (128, 256), "distill": (100, 500), "crop_padding": 1 / 8},
    ("digits", "vit"): {"overrides": ["dataset=digits", "backbone=clip_small"], "epochs": 30, "quick_epochs": 15,
                        "subset": None, "optimizer": "adamw", "di_steps": (400, 2000), "images": (256, 512),
                        "distill": (300, 600)},
}
REFERENCE = 7000  # real training images the Fréchet distance compares with (digits: all 1154 not fitted on)
TEST_IMAGES = (2000, 10000)  # real test images the students are evaluated on (quick, full); digits has 450


STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line on stderr (stdout's last line is the JSON)."""
    print(f"[inversion_speed {time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def build_net(cfg, bundle) -> IncrementalClassifier:
    net = IncrementalClassifier(instantiate(cfg.backbone))
    net.grow(bundle.num_classes)
    if hasattr(net.backbone, "set_input_normalization"):  # CLIP: undo the dataset's normalisation inside
        net.backbone.set_input_normalization(bundle.mean, bundle.std)
    return net


def plain(dataset, index: torch.Tensor) -> torch.Tensor:
    """Normalised images of `dataset` at `index`, without its training augmentation."""
    images = dataset.images[index]
    images = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    return (images - dataset.mean) / dataset.std


def train_teacher(cfg, bundle, setting: dict, quick: bool) -> tuple[IncrementalClassifier, dict[str, Any]]:
    began = time.perf_counter()
    torch.manual_seed(0)
    net = build_net(cfg, bundle)
    epochs = setting["quick_epochs"] if quick else setting["epochs"]
    subset = setting["subset"]
    n = len(bundle.train) if subset is None else min(subset // (2 if quick else 1), len(bundle.train))
    index = torch.randperm(len(bundle.train))[:n]
    train, padding = bundle.train, None
    if setting.get("crop_padding"):  # 4 px of padding is 1/8 of a 32-px side but 1/4 of a 16-px one: scale it
        padding = max(1, round(setting["crop_padding"] * train.images.shape[-1]))
        train = copy.copy(train)  # same tensors, its own augmentation
        train.augment = crop_flip(padding=padding)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train, index.tolist()), batch_size=128,
                                         shuffle=True)
    if setting["optimizer"] == "adamw":  # ViTs from scratch: AdamW, one-cycle, label smoothing
        peak, optimizer = 2e-3, torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    else:
        peak, optimizer = 0.1, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, peak, total_steps=epochs * len(loader),
                                                    pct_start=0.15 if setting["optimizer"] == "adamw" else 0.3)
    smoothing = 0.1 if setting["optimizer"] == "adamw" else 0.0
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(net(x), y, label_smoothing=smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval().requires_grad_(False)
    test_x = plain(bundle.test, torch.arange(len(bundle.test)))
    info = {"epochs": epochs, "train_images": n, "crop_padding": padding or "dataset",
            "train_s": time.perf_counter() - began, "test_accuracy": accuracy(net, test_x, bundle.test.targets)}
    return net, info


@torch.no_grad()
def accuracy(net, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    with frozen_eval(net):
        predictions = torch.cat([net(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return 100.0 * float((predictions == labels).float().mean())


class Criterion:
    """Replay's quality figures of a synthetic set; `meets` compares them with `thresholds` (once set)."""

    def __init__(self, teacher, labels: torch.Tensor, real_features: torch.Tensor) -> None:
        self.teacher, self.labels, self.real_features = teacher, labels, real_features
        self.thresholds: dict[str, float] | None = None

    @torch.no_grad()
    def measure(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float | None]:
        labels = self.labels if labels is None else labels
        with frozen_eval(self.teacher), BNStatistics(self.teacher) as bn:
            features = self.teacher.features(images).float()
            bn_distance = float(bn.kl()) if len(bn) else None
            logits = self.teacher.head(features)
        return {"teacher_accuracy": 100.0 * float((logits.argmax(1) == labels).float().mean()),
                "feature_distance": frechet_distance(features, self.real_features),
                "bn_distance": bn_distance}  # diagnostic only

    def meets(self, q: dict) -> bool:
        t = self.thresholds
        return q["teacher_accuracy"] >= t["teacher_accuracy"] and q["feature_distance"] <= t["feature_distance"]


class Watch:
    """Step hook: the criterion's figures every `every` steps with the clock stopped while it measures;
    keeps the images where the criterion is first met (or every measured batch, `keep_all`, for the arm
    that sets the thresholds)."""

    def __init__(self, criterion: Criterion, engine, every: int, keep_all: bool = False) -> None:
        self.criterion, self.engine, self.every, self.keep_all = criterion, engine, every, keep_all
        self.paused = 0.0
        self.started = time.perf_counter()
        self.curve: list[dict[str, Any]] = []
        self.snapshots: list[torch.Tensor] = []
        self.reached: dict[str, Any] | None = None
        self.reached_images: torch.Tensor | None = None
        self.start_images: torch.Tensor | None = None

    def __call__(self, images, step: int) -> None:
        if (step + 1) % self.every:
            return
        pause = time.perf_counter()
        q = self.criterion.measure(images, getattr(self.engine, "last_labels", None))  # PMI draws its own labels
        point = {"step": step + 1, "passes": self.engine.stats.full_model_passes,
                 "wall_s": pause - self.started - self.paused, **q}
        self.curve.append(point)
        if step < 0:
            self.start_images = images.clone()  # the engine updates its tensor in place
        if self.keep_all:
            self.snapshots.append(images.clone())
        if self.criterion.thresholds is not None and self.reached is None and self.criterion.meets(q):
            self.reached, self.reached_images = point, images.clone()
        self.paused += time.perf_counter() - pause

    def settle(self) -> None:
        """For the threshold-setting arm: its first measured point that meets the thresholds set afterwards."""
        for point, images in zip(self.curve, self.snapshots):
            if self.criterion.meets(point):
                self.reached, self.reached_images = point, images
                break
        self.snapshots = []


def summary(point: dict | None) -> dict | None:
    keys = ("step", "passes", "wall_s", "teacher_accuracy", "feature_distance", "bn_distance")
    return None if point is None else {k: point[k] for k in keys}


def speedup(reference: dict | None, point: dict | None, key: str) -> float | None:
    """reference / point; None when either never met the criterion, or met it at the start (zero passes)."""
    if reference is None or point is None or not point["passes"] or not point[key]:
        return None
    return reference[key] / point[key]


@torch.no_grad()
def feature_error(teacher, images, targets) -> float:
    """Relative squared error of the images' features to their target features (1 = as far as zero)."""
    with frozen_eval(teacher):
        return float((teacher.features(images) - targets).pow(2).mean() / targets.pow(2).mean())


def vit_per_layer_arm(overrides: list[str], settings: dict[str, Any], teacher, bundle, train_sample,
                      classes: list[int]) -> dict[str, Any]:
    """PMI's ViT per-block inversion (`conf/inversion/engine/vit_per_layer.yaml` + the profile's budget,
    `settings` over it) directly on the teacher: block statistics and feature model from the real sample (timed
    apart), then one synthesis of `per_class` pool entries (inputs of block `start_block`) per class. Block
    errors: the engine's reconstruction MSE of each block (first step, kept iterate), image-weighted over its
    layer batches; the pool's features after the full-model phase against their targets."""
    cfg = compose([*overrides, "inversion/engine=vit_per_layer"]).inversion.vit_per_layer
    engine = instantiate(cfg, progress=False, **settings)
    engine.setup(bundle.image_shape, bundle.pixel_range())
    torch.manual_seed(1)
    began = time.perf_counter()
    engine.observe(teacher, train_sample, None, None)
    observe_s = time.perf_counter() - began
    began = time.perf_counter()
    with frozen_eval(teacher):
        pool, labels = engine.synthesize(teacher, classes, 0)
    synthesis_s = time.perf_counter() - began
    blocks = list(teacher.backbone.blocks())
    per_batch = len(blocks) - engine.start_block
    sizes = [min(engine.layer_batch, len(labels) - i) for i in range(0, len(labels), engine.layer_batch)]
    losses = torch.tensor(engine.block_losses).view(len(sizes), per_batch, 2)  # last layer batch first
    weights = torch.tensor(sizes[::-1], dtype=torch.float).view(-1, 1, 1)
    first, kept = ((losses * weights).sum(0) / weights.sum()).T.tolist()
    with torch.no_grad(), frozen_eval(teacher):
        x = pool
        for block in blocks[engine.start_block :]:
            x = block(x)
        targets = engine.last_targets
        relative = float((x - targets).pow(2).mean() / targets.pow(2).mean())
        correct = float((teacher.head(x).argmax(1) == labels).float().mean())
    return {"engine": "vit_per_layer", "settings": {k: cfg[k] for k in (
                "statistics", "start_block", "layer_steps", "start_steps", "full_steps", "per_class", "layer_batch",
                "batch_size", "lr", "layer_lr", "start_lr", "bn_weight", "input_tv_weight")} | settings,
            "n_blocks": len(blocks), "pool_shape": list(pool.shape), "n_images": len(labels),
            "block_mse": {str(engine.start_block + i): {"first": f, "kept": k}
                          for i, (f, k) in enumerate(zip(first, kept))},
            "feature_relative_error": relative, "teacher_accuracy": 100.0 * correct,
            "observe_s": observe_s, "synthesis_s": synthesis_s, "seconds_per_class": synthesis_s / len(classes),
            "passes": engine.stats.full_model_passes}


def distill(teacher, student, images: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *, steps: int,
            batch: int = 64, lr: float = 1e-3, temperature: float = 4.0, jitter: int = 0, flip: bool = False,
            seed: int = 0) -> float:
    """Data-free distillation: train `student` (fresh) for `steps` Adam steps (cosine lr) on `images` only,
    on the KL divergence to the teacher's temperature-softened outputs on the same (jittered/flipped) views;
    return the student's top-1 accuracy (%) on the real `test_x`."""
    generator = torch.Generator().manual_seed(seed)
    rng = torch.get_rng_state()
    torch.manual_seed(seed)  # the same augmentation draws for every arm
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            x = images[torch.randint(len(images), (min(batch, len(images)),), generator=generator)]
            x = jitter_flip(x, jitter, flip)
            with torch.no_grad(), frozen_eval(teacher):
                soft = F.softmax(teacher(x) / temperature, dim=1)
            log_student = F.log_softmax(student(x) / temperature, dim=1)
            loss = F.kl_div(log_student, soft, reduction="batchmean") * temperature**2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_rng_state(rng)
    student.eval()
    return accuracy(student, test_x, test_y)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets (minutes on 2 cores)")
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default=None,
                        help="default: digits for the CNN teacher, cifar10 for the ViT")
    parser.add_argument("--teacher", choices=("cnn", "vit"), default="cnn",
                        help="cnn: the dataset's CNN (small_cnn / resnet32); vit: an open_clip ViT (clip_small)")
    parser.add_argument("--backbone", default=None, help="override the teacher's backbone config (e.g. clip_tiny)")
    parser.add_argument("--image-size", type=int, default=16, help="cifar10: resize to this size (the cached 16)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images per arm")
    parser.add_argument("--di-steps", type=int, default=None, help="DeepInversion's steps (sets the thresholds)")
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--distill-steps", type=int, default=None, help="student steps per distillation")
    parser.add_argument("--test-images", type=int, default=None, help="real test images the students are scored on")
    parser.add_argument("--every", type=int, default=5, help="measure the criterion every this many steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--save", type=Path, default=None, help="write each arm's images (end, at criterion) here")
    parser.add_argument("--verbose", action="store_true", help="print the quality curves")
    parser.add_argument("--pmi-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a per_layer engine setting of the dataset's config (repeatable), "
                             "e.g. --pmi-set full_steps=60 --pmi-set bn_loss=norm")
    parser.add_argument("--vit-per-layer", choices=("add", "only"), default=None,
                        help="ViT teacher: also (add) or only run PMI's CLIP per-block engine (vit_per_layer)")
    parser.add_argument("--vit-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a vit_per_layer setting (repeatable), e.g. --vit-set start_block=2")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset or ("cifar10" if args.teacher == "vit" else "digits")
    setting = dict(SETTINGS[(dataset, args.teacher)])
    if args.teacher_epochs is not None:
        setting["epochs"] = setting["quick_epochs"] = args.teacher_epochs
    overrides = list(setting["overrides"])
    if dataset == "cifar10":
        overrides.append(f"dataset.image_size={args.image_size}")
    if args.backbone:
        overrides = [o for o in overrides if not o.startswith("backbone=")] + [f"backbone={args.backbone}"]
    cfg = compose(overrides)
    # the two engines as the framework builds them for this dataset (conf/inversion/engine + the profile's budget)
    pixel_cfg = compose([*overrides, "inversion/engine=pixel"]).inversion.pixel
    per_layer_cfg = compose([*overrides, "inversion/engine=per_layer"]).inversion.per_layer
    bundle = build_dataset(cfg)
    quick = 0 if args.quick else 1
    teacher, teacher_info = train_teacher(cfg, bundle, setting, args.quick)
    say(f"teacher trained: {teacher_info['test_accuracy']:.1f} % on real test images")
    n = args.images or setting["images"][quick]
    classes = list(range(bundle.num_classes))
    labels = balanced_labels(classes, n)
    pixel_range = bundle.pixel_range()
    di_steps = args.di_steps or setting["di_steps"][quick]
    every = args.every

    # real images: PMI's feature model fits on one sample of the training set (every 7th image), the
    # criterion's Fréchet reference is drawn from the rest (at most REFERENCE images); students score on test images
    everything = torch.arange(len(bundle.train))
    fit_index, rest = everything[everything % 7 == 0], everything[everything % 7 != 0]
    reference_index = rest[:: math.ceil(len(rest) / REFERENCE)]
    train_sample = [(plain(bundle.train, fit_index), bundle.train.targets[fit_index])]
    reference = plain(bundle.train, reference_index)
    with frozen_eval(teacher):
        real_features = batched_features(teacher, reference)
    criterion = Criterion(teacher, labels, real_features)
    test_pick = torch.randperm(len(bundle.test), generator=torch.Generator().manual_seed(0))
    test_pick = test_pick[: args.test_images or TEST_IMAGES[quick]]
    test_x, test_y = plain(bundle.test, test_pick), bundle.test.targets[test_pick]

    vit_arm = None
    if args.vit_per_layer:
        vit_settings = {key: yaml.safe_load(value) for key, _, value in (i.partition("=") for i in args.vit_set)}
        vit_arm = vit_per_layer_arm(overrides, vit_settings, teacher, bundle, train_sample, classes)
        say(f"vit_per_layer done: {vit_arm['seconds_per_class']:.1f} s per class")
        if args.vit_per_layer == "only":
            result = {"dataset": dataset, "teacher": args.teacher, "quick": args.quick,
                      "threads": torch.get_num_threads(), "teacher_info": teacher_info, "vit_per_layer": vit_arm}
            print(json.dumps(result))
            return result

    torch.manual_seed(1)
    # the engines as the framework builds them for this dataset, same batch
    di = instantiate(pixel_cfg, steps=di_steps, batch_size=n, progress=False)
    di.setup(bundle.image_shape, pixel_range)
    watch_di = Watch(criterion, di, every, keep_all=True)
    di.step_hook = watch_di
    di_images, _ = di.synthesize(teacher, classes, n)
    end = watch_di.curve[-1]
    criterion.thresholds = {"teacher_accuracy": end["teacher_accuracy"], "feature_distance": end["feature_distance"]}
    watch_di.settle()
    say(f"deepinversion done: thresholds {criterion.thresholds}")

    pmi_args = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.pmi_set)}

    def pmi_engine(fitted=None, **overrides):
        """A per-layer engine; its task-boundary feature model fitted (timed) or shared with `fitted`."""
        engine = instantiate(per_layer_cfg, batch_size=n, progress=False, **{**pmi_args, **overrides})
        engine.setup(bundle.image_shape, pixel_range)
        began = time.perf_counter()
        if fitted is None:
            engine.observe(teacher, train_sample, None, None)
        else:
            engine.features = fitted.features
        return engine, time.perf_counter() - began

    torch.manual_seed(1)
    pmi, feature_model_s = pmi_engine()  # the boundary's Gaussians + contrastive encoders: reported, not counted
    after_fit = torch.get_rng_state()  # the ablations restart here: the same sampled feature targets
    watch_pmi = Watch(criterion, pmi, every)
    pmi.step_hook = watch_pmi
    pmi_images, _ = pmi.synthesize(teacher, classes, n)
    say("pmi done")

    # Ablations, same targets and budget: what the per-layer phase itself buys.
    # (1) PMI's full-model inversion from noise (layer_steps=0);
    torch.set_rng_state(after_fit)
    no_layers, _ = pmi_engine(pmi, layer_steps=0)
    watch_no_layers = Watch(criterion, no_layers, every)
    no_layers.step_hook = watch_no_layers
    no_layers_images, _ = no_layers.synthesize(teacher, classes, n)
    if not torch.equal(no_layers.last_targets, pmi.last_targets):
        raise RuntimeError("ablation without the per-layer phase sampled other feature targets than PMI")
    # (2) the same from real test images of the same labels: a bound on what any initialisation can buy.
    torch.set_rng_state(after_fit)
    from_real, _ = pmi_engine(pmi)
    by_class = {c: (bundle.test.targets == c).nonzero().flatten().tolist() for c in classes}
    real_init = plain(bundle.test, torch.tensor([by_class[int(c)].pop(0) for c in pmi.last_labels]))
    from_real.last_labels = pmi.last_labels
    watch_real = Watch(criterion, from_real, every)
    from_real.step_hook = watch_real
    with frozen_eval(teacher):
        from_real_images = from_real.invert_full(teacher, real_init, pmi.last_targets, pmi.last_labels)
    say("ablations done")

    # Data-free distillation: the same fresh student (seed), budget and augmentation for every image set.
    distill_steps = args.distill_steps or setting["distill"][quick]
    jitter, flip = int(pixel_cfg.jitter), bool(pixel_cfg.flip)
    distill_settings = {"steps": distill_steps, "batch": 64, "lr": 1e-3, "temperature": 4.0, "jitter": jitter,
                        "flip": flip, "test_images": len(test_y), "optimizer": "adam, cosine",
                        "student": "fresh, the teacher's architecture (seed 0)"}

    def student_accuracy(images: torch.Tensor) -> float:
        torch.manual_seed(0)
        student = build_net(cfg, bundle)
        return distill(teacher, student, images, test_x, test_y, steps=distill_steps, jitter=jitter, flip=flip)

    began = time.perf_counter()
    arms = {"deepinversion": (watch_di, di_images), "pmi": (watch_pmi, pmi_images),
            "pmi_without_per_layer": (watch_no_layers, no_layers_images),
            "pmi_from_real_images": (watch_real, from_real_images)}
    reached_di = watch_di.reached
    report: dict[str, dict[str, Any]] = {}
    for name, (watch, images) in arms.items():
        end_accuracy = student_accuracy(images)
        at = None
        if watch.reached is not None:  # the same images as the end when the criterion is first met there
            same = watch.reached["step"] == watch.curve[-1]["step"]
            at = end_accuracy if same else student_accuracy(watch.reached_images)
        say(f"{name}: distillation accuracy {end_accuracy:.1f} (end), {at} (at criterion)")
        report[name] = {"start": summary(watch.curve[0]), "reached": summary(watch.reached),
                        "end": summary(watch.curve[-1]),
                        "distillation_accuracy": {"end": end_accuracy, "at_criterion": at}}
        if name != "deepinversion":
            report[name]["speedup_passes"] = speedup(reached_di, watch.reached, "passes")
            report[name]["speedup_wall"] = speedup(reached_di, watch.reached, "wall_s")
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save({"end": images, "at_criterion": watch.reached_images, "labels": labels},
                       args.save / f"{name}.pt")
    real_pick = torch.cat([(bundle.train.targets[reference_index] == c).nonzero().flatten()[: (labels == c).sum()]
                           for c in classes])
    real_images = reference[real_pick]  # n real training images, class-balanced: distillation's reference
    real_distill = student_accuracy(real_images)
    distill_s = time.perf_counter() - began
    real_test = criterion.measure(real_init, pmi.last_labels)  # the same figures on real test images, for scale

    result = {
        "dataset": dataset, "teacher": args.teacher,
        "backbone": args.backbone or cfg.backbone.get("model_name") or cfg.backbone._target_.rsplit(".", 1)[-1],
        "image_shape": list(bundle.image_shape), "n_images": n, "quick": args.quick,
        "threads": torch.get_num_threads(), "teacher_info": teacher_info,
        "criterion": {
            "figures": {"teacher_accuracy": ">=", "feature_distance": "<="},
            "reference": f"DeepInversion's end values ({di_steps} steps)", **criterion.thresholds,
            "feature_distance_reference": f"Fréchet distance of teacher penultimate features to {len(reference)} "
                                          "real training images (all classes)",
            "measured_every": every, "diagnostic_only": ["bn_distance"]},
        "deepinversion": report["deepinversion"], "pmi": report["pmi"],
        "ablations": {k: report[k] for k in ("pmi_without_per_layer", "pmi_from_real_images")},
        "speedup_passes": report["pmi"]["speedup_passes"], "speedup_wall": report["pmi"]["speedup_wall"],
        "distillation": {**distill_settings, "real_train_images_accuracy": real_distill, "total_s": distill_s},
        "real_test_batch": real_test,
        # how far the per-layer chain carries the target back: each block's reconstruction MSE (first step, kept
        # iterate; image-level block first) and the per-layer image's features vs their targets
        "pmi_block_errors": pmi.block_losses,
        "pmi_start_feature_error": feature_error(teacher, watch_pmi.start_images, pmi.last_targets),
        "from_real_start_feature_error": feature_error(teacher, watch_real.start_images, pmi.last_targets),
        "pmi_per_layer_passes": pmi.stats.full_model_passes - pmi.full_steps,
        "pmi_feature_model_s": feature_model_s,
        "engines": {"deepinversion": {"steps": di_steps, "lr": di.lr, "jitter": di.jitter, "flip": di.flip},
                    "pmi": {"layer_steps": pmi.layer_steps, "full_steps": pmi.full_steps, "lr": pmi.lr,
                            "layer_lr": pmi.layer_lr, **pmi_args}},
        "notes": sorted(set(di.stats.notes + pmi.stats.notes)),
    }
    if vit_arm is not None:
        result["vit_per_layer"] = vit_arm
    if args.verbose:
        for name, (watch, _) in arms.items():
            for point in watch.curve[:: max(1, len(watch.curve) // 8)] + watch.curve[-1:]:
                print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
