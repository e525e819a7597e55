"""Every option of every config group composes, validates and instantiates (in the manner of
lightning-hydra-template's test_configs.py), and every inversion student pairs with every engine."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from cl_inversion.inversion.callback import InversionCallback
from cl_inversion.methods.inversion_student import InversionStudent
from cl_inversion.run import (
    CONFIG_DIR,
    LOADER_KEYS,
    build_callbacks,
    build_dataset,
    build_method,
    chosen_engine,
    compose,
)
from cl_inversion.utils.errors import ConfigError, user_error
from cl_inversion.utils.validate import validate_config

CONF = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    cfg = compose(list(overrides))
    validate_config(cfg, {"dataset": {k: int for k in LOADER_KEYS}})
    return cfg


ENGINES = [e for e in options("inversion/engine") if e != "none"]
STUDENTS = [m for m in options("method") if chosen_engine(compose([f"method={m}"]))[0]]


def test_the_groups_are_the_ones_documented():
    assert ENGINES == ["generator", "per_layer", "pixel", "rdfcil_generator", "remix", "vit_per_layer"]
    assert STUDENTS == ["abd", "deepinversion", "moe_adapter", "pmi", "rdfcil", "remix"]
    assert options("profile") == ["cifar10_cpu", "digits_cpu", "published", "smoke"]
    for profile in options("profile"):  # every profile budgets every engine (a missing file is an error, not a no-op)
        assert options(f"budget/{profile}") == sorted([*ENGINES, "none"]), profile


def backbone_for(method: str) -> list[str]:
    """The CLIP learner needs open_clip with experts; every other method runs on the default backbone."""
    return ["backbone=moe_clip_tiny"] if method == "moe_adapter" else []


@pytest.mark.parametrize("method", options("method"))
def test_every_method_builds_with_its_callbacks(method):
    cfg = composed(f"method={method}", *backbone_for(method))
    built = build_method(cfg)
    callbacks = build_callbacks(cfg, built)
    inversion = [cb for cb in callbacks if isinstance(cb, InversionCallback)]
    if method in STUDENTS:
        engine = chosen_engine(cfg)[0]
        assert isinstance(built, InversionStudent)
        assert len(inversion) == 1 and inversion[0].engine.name == engine.replace("rdfcil_", "").replace("vit_", "")
    else:
        assert not isinstance(built, InversionStudent) and not inversion


@pytest.mark.parametrize("student", STUDENTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_student_pairs_with_every_engine(student, engine):
    cfg = composed(f"method={student}", f"method.inversion={engine}", *backbone_for(student))
    [callback] = [cb for cb in build_callbacks(cfg, build_method(cfg)) if isinstance(cb, InversionCallback)]
    assert type(callback.engine).__name__ == cfg.inversion[engine]._target_.rsplit(".", 1)[1]


def test_a_method_that_does_not_replay_refuses_an_engine(cli, tmp_path):
    bad = cli("method=lwf", "inversion/engine=pixel", run_dir=tmp_path, check=False)
    assert bad.returncode == 2 and "LwF replays no synthetic images" in bad.stderr and "Traceback" not in bad.stderr


def published_engine(name: str) -> dict:
    return dict(compose(["profile=published", f"inversion/engine={name}"]).inversion[name])


def test_remix_engine_is_pmis_but_its_target_and_covariance_weight():
    per_layer, remix = published_engine("per_layer"), published_engine("remix")
    assert {k for k in per_layer if per_layer[k] != remix[k]} == {"_target_", "laplace_weight"}
    assert (remix["laplace_weight"], per_layer["laplace_weight"]) == (0.5, 0.0)
    assert compose(["method=remix"]).method == compose(["method=pmi"]).method
    for profile in ("digits_cpu", "cifar10_cpu", "smoke"):  # and the same budget in every profile
        budgeted = [compose([f"profile={profile}", f"method={m}"]).inversion[e] for m, e in (("pmi", "per_layer"),
                                                                                             ("remix", "remix"))]
        assert {k for k in budgeted[0] if budgeted[0][k] != budgeted[1][k]} == {"_target_", "laplace_weight"}


def test_rdfcil_generator_inherits_abds_generator_but_two_keys():
    generator, rdfcil = published_engine("generator"), published_engine("rdfcil_generator")
    assert {k for k in generator if generator[k] != rdfcil[k]} == {"steps", "keep_across_tasks"}
    assert (rdfcil["steps"], rdfcil["keep_across_tasks"], generator["steps"]) == (5000, False, 10000)


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_instantiates_and_gives_features(backbone):
    clip = backbone.startswith(("clip", "moe_clip"))
    overrides = [f"backbone={backbone}"] + (["backbone.pretrained=null"] if clip else [])
    cfg = composed(*overrides, "dataset=digits")
    net = instantiate(cfg.backbone)
    size = 32 if backbone in ("resnet32", "resnet18") or clip else 8
    channels = 1 if not clip else 3
    if backbone in ("resnet32", "resnet18"):
        channels = cfg.backbone.get("in_channels", 1)
    with torch.no_grad():
        features = net.eval()(torch.randn(2, channels, size, size))
    assert features.shape == (2, net.feature_dim)


def test_digits_and_an_image_folder_instantiate_and_torchvision_sets_need_their_files(tmp_path):
    from PIL import Image

    assert len(build_dataset(composed("dataset=digits")).train) > 1000
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (40, 90, 200)).save(tmp_path / split / name / "0.png")
    folder = build_dataset(composed("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.cache=false"))
    assert folder.class_names == ["a", "b"] and folder.image_shape == (3, 8, 8)
    for name in ("cifar10", "cifar100"):
        with pytest.raises(Exception) as raised:  # Hydra's InstantiationException wraps our ConfigError
            build_dataset(composed(f"dataset={name}", f"dataset.root={tmp_path / 'absent'}"))
        assert isinstance(user_error(raised.value), ConfigError) and "dataset.root=" in str(user_error(raised.value))


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_composes_and_the_cpu_ones_instantiate(trainer, tmp_path):
    cfg = composed(f"trainer={trainer}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("a GPU trainer needs a GPU to instantiate (composition and validation passed)")
    built = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
    assert isinstance(built, L.Trainer) and built.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_instantiates(logger, tmp_path, monkeypatch):
    from cl_inversion.utils import logging_utils

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = composed(f"logger={logger}")
    built = logging_utils.build_logger(cfg, tmp_path)
    assert (built is False) == (logger == "none")
    logging_utils.finish(built, "success")


@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_scheduler_instantiates_on_an_optimizer(scheduler):
    cfg = composed(f"scheduler={scheduler}")
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    built = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    assert built is None if scheduler == "none" else isinstance(built, torch.optim.lr_scheduler.LRScheduler)
