"""Experiment presets (conf/experiment/): every one composes, states its published number, and its smoke
variant (`+smoke=digits`) runs the real code path to a completed results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, run_in_process

from cl_inversion.data.datasets import imagefolder
from cl_inversion.run import chosen_engine
from cl_inversion.utils.errors import ConfigError

EXPERIMENTS = REPO / "conf" / "experiment"
# presets that reproduce a published row (they pick a method and name their task count); cifar10_cpu is a CPU
# budget and cifar10_cpu_reference the reference ABD run at that budget, both tested below
# (the CLIP learner's preset has its own recipe and no published figure verified here: tests/test_fidelity_pmi_clip.py)
PRESETS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")
                 if "override /method:" in p.read_text() and re.search(r"_\d+t$", p.stem)
                 and "moe_clip" not in p.read_text())


def preset_method(name: str) -> str:
    match = re.search(r"override /method:\s*(\w+)", (EXPERIMENTS / f"{name}.yaml").read_text())
    assert match, f"{name}: no `override /method:` in its defaults list"
    return match.group(1)


ALL_PRESETS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def test_presets_exist():
    for method in ("finetune", "lwf", "deepinversion", "abd", "rdfcil"):
        for tasks in (5, 10, 20):
            assert f"{method}_cifar100_{tasks}t" in PRESETS
    assert {"pmi_cifar100_10t", "vdfd_cifar100_10t"} <= set(PRESETS)
    assert {f"{m}_cifar100_{t}t" for m in ("pmi", "remix") for t in (5, 10, 20)} <= set(PRESETS)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_composes_and_validates(compose, name):
    from cl_inversion.run import LOADER_KEYS
    from cl_inversion.utils.validate import validate_config

    assert (EXPERIMENTS / f"{name}.yaml").read_text().startswith("# @package _global_")
    cfg = compose([f"experiment={name}"])
    validate_config(cfg, {"dataset": {k: int for k in LOADER_KEYS}})
    assert cfg.experiment_name == name


@pytest.mark.parametrize("name", PRESETS)
def test_paper_preset_has_its_split_recipe_and_published_figure(compose, name):
    cfg = compose([f"experiment={name}"])
    tasks = int(re.search(r"_(\d+)t$", name).group(1))
    # every paper row here is on equal splits: ABD's table (first = other split size) and R-DFCIL's shipped
    # config (num_tasks, init_task_splits 0)
    assert cfg.scenario.n_tasks == tasks and cfg.scenario.first_task_classes is None
    assert cfg.dataset._target_ == "cl_inversion.data.cifar100"
    published = cfg.published
    assert published is not None and published.source, f"{name}: no published block"
    method = preset_method(name)
    if method != "vdfd":  # ABD's and R-DFCIL's recipes share these (VDFD has its own: tests/test_vdfd.py)
        assert cfg.dataset.batch_size == 128 and cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0.9
    if method in ("finetune", "lwf", "deepinversion", "abd"):  # ABD's recipe
        assert cfg.scheduler._target_.endswith("MultiStepLR")
        assert cfg.trainer.max_epochs == 250 and list(cfg.scheduler.milestones) == [100, 150, 200]
        assert cfg.optimizer.weight_decay == 2e-4 and cfg.dataset.color_jitter is True
        assert cfg.backbone.variant == "abd" and cfg.trainer.precision == "32-true"
        assert "ABD" in published.source and published.final_accuracy is not None
    if method in ("rdfcil", "pmi", "remix"):  # R-DFCIL's recipe (PMI's and REMIX's scripts train with the same values)
        assert cfg.trainer.max_epochs == 200 and list(cfg.scheduler.milestones) == [80, 120]
        assert cfg.optimizer.weight_decay == 5e-4 and cfg.dataset.color_jitter is False
        assert cfg.backbone.variant == "cl_lite"
    if method == "rdfcil":
        assert cfg.method.finetune_fraction == 0.2
    if method == "remix":  # REMIX resnet32/scripts/task_cont_cifar100_{5,10,20}_task.sh: PMI's values + alpha_frob
        assert cfg.inversion.remix.laplace_weight == (0.05 if tasks == 5 else 0.5)
        assert published.final_accuracy == (45.34 if tasks == 10 else None) and "REMIX" in published.source
    if method in ("pmi", "remix"):  # RuilinTong/PMI-CFS-DFCL scripts/task_cont_cifar100_{5,10,20}_task.sh
        pool = {5: (6000, 5000), 10: (3000, 2000), 20: (2000, 1000)}[tasks]
        assert (cfg.inversion.n_images, cfg.inversion.n_images_per_task) == pool
        assert cfg.method.ft_scale == (1.0 if tasks == 20 else 1.5)
        assert list(cfg.method.stage_epochs) == [20, 20, 0, 0, 120] and cfg.method.finetune_epochs == 40
        assert list(cfg.method.stage_lrs) == [0.1, 0.05, 0.0, 0.0, 5e-3 if tasks == 5 else 1e-2]
        assert cfg.scenario.class_order[:4] == [23, 8, 11, 7] and len(set(cfg.scenario.class_order)) == 100
        e = cfg.inversion[chosen_engine(cfg)[0]]
        assert (e.layer_steps, e.layer_lr, e.full_steps, e.lr, e.bn_weight, e.layer_bn_factor, e.batch_size) == \
            (50, 0.8, 160, 0.4, 0.25, 20.0, 4000)
        assert "REMIX" in published.source or published.final_accuracy is None
    if method == "rdfcil":
        assert "R-DFCIL" in published.source and published.final_accuracy is not None
        assert cfg.inversion.rdfcil_generator.steps == 5000
    if method == "deepinversion":  # ABD's DeepInversion row: DeepInversionGenBN, ABD's generator
        assert chosen_engine(cfg)[0] == "generator" and cfg.inversion.generator.steps == 10000
    if method == "vdfd":  # XiaorongLi-95/VDFD scripts/vdfd.sh
        assert cfg.dataset.batch_size == 16 and cfg.trainer.max_epochs == 100 and list(cfg.scheduler.milestones) == [50]
        assert cfg.scheduler.gamma == 0.5 and cfg.scenario.shuffle_classes is False
        assert cfg.method.optimizer_class == "torch.optim.Adam" and cfg.method.reg_coef == 50.0
        assert (cfg.method.backbone_lr, cfg.method.head_lr, cfg.method.gcn_lr) == (1e-4, 1e-3, 1e-4)
        assert cfg.method.head_bias is False and cfg.method.regularise_head is False
        assert published.final_accuracy == 31.09 and "XiaorongLi-95/VDFD" in published.source
    smoke = compose([f"experiment={name}", "+smoke=digits"])
    assert smoke.dataset._target_ == "cl_inversion.data.digits" and smoke.trainer.max_epochs == 1
    assert smoke.method == cfg.method and smoke.backbone._target_ == cfg.backbone._target_


def test_abd_presets_use_published_generator_budget(compose):
    cfg = compose(["experiment=abd_cifar100_10t"])
    assert chosen_engine(cfg)[0] == "generator" and cfg.backbone.depth == 32 and cfg.profile == "published"
    assert (cfg.inversion.generator.steps, cfg.inversion.generator.batch_size, cfg.inversion.generator.lr) == \
        (10000, 128, 1e-3)


@pytest.mark.slow
def test_every_preset_smoke_runs(tmp_path):
    """Every paper preset's smoke variant in one multirun (one process: no per-run start-up)."""
    run_cli("-m", f"experiment={','.join(PRESETS)}", "+smoke=digits", f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=${hydra.job.num}", timeout=900)
    done = {}
    for path in sorted(Path(tmp_path).glob("*/results.json")):
        res = json.loads(path.read_text())
        assert res["status"] == "completed", (path, res.get("error"))
        assert res["tasks_completed"] == 2 and len(res["accuracy_matrix"]) == 2
        done[res["config"]["experiment_name"]] = res["method"]
    assert sorted(done) == PRESETS
    assert all(done[name] == preset_method(name) for name in PRESETS)


def tiny_imagefolder(root: Path, classes: int = 4, train: int = 6, test: int = 3) -> Path:
    """A real ImageFolder tree of small random JPEGs."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(12, 12, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def test_imagefolder_train_per_class_is_a_seeded_balanced_subset(tmp_path):
    root = tiny_imagefolder(tmp_path / "data")
    full = imagefolder(str(root), cache=False)
    a = imagefolder(str(root), cache=False, train_per_class=4, subset_seed=0)
    b = imagefolder(str(root), cache=False, train_per_class=4, subset_seed=0)
    c = imagefolder(str(root), cache=False, train_per_class=4, subset_seed=1)
    assert len(full.train) == 24 and len(a.train) == 16 and len(a.test) == 12  # the test split stays whole
    assert a.train.targets.bincount().tolist() == [4, 4, 4, 4]
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    with pytest.raises(ConfigError, match="dataset.train_per_class"):
        imagefolder(str(root), cache=False, train_per_class=0)


def test_cifar10_cpu_preset_composes_and_runs_on_an_imagefolder(compose, tmp_path):
    cfg = compose(["experiment=cifar10_cpu"])
    assert cfg.dataset._target_ == "cl_inversion.data.imagefolder" and cfg.backbone.depth == 32
    assert (cfg.dataset.image_size, cfg.dataset.train_per_class, cfg.trainer.max_epochs) == (16, 1000, 15)
    assert cfg.scenario.n_tasks == 5 and cfg.inversion.n_images == 512
    root = tiny_imagefolder(tmp_path / "data")
    run_dir = tmp_path / "run"
    res = run_in_process("experiment=cifar10_cpu", "method=abd", f"dataset.root={root}", "dataset.cache=false",
                         "dataset.train_per_class=4", "dataset.batch_size=8", "scenario.n_tasks=2",
                         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
                         "inversion.n_images=16", "inversion.generator.steps=2", "inversion.generator.batch_size=8",
                         run_dir=run_dir)
    assert res["status"] == "completed" and res["config"]["experiment_name"] == "cifar10_cpu"
    assert res["config"]["profile"] == "cifar10_cpu" and list(res["config"]["inversion"]) == [
        "n_images", "n_images_per_task", "grid", "generator"]  # the profile, and only the engine the run used
    assert res["config"]["dataset"]["image_size"] == 16 and len(res["inversion"]) == 1


def test_cifar10_cpu_reference_is_abds_recipe_and_its_head_loss(compose):
    cfg = compose(["experiment=cifar10_cpu_reference"])
    assert cfg.method._target_ == "cl_inversion.methods.ABD" and cfg.method.head_classes == "all"
    assert (cfg.backbone.variant, cfg.dataset.color_jitter, cfg.optimizer.lr) == ("abd", True, 0.1)
    assert cfg.trainer.max_epochs == 15 and cfg.dataset.image_size == 16  # cifar10_cpu's budget
