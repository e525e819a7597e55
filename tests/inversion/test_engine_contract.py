"""The student-engine contract (inversion/engine.py): what the callback calls, in which order, and the one
hand-over of the replay to an `InversionStudent` (methods/inversion_student.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from cl_inversion.data.datasets import digits
from cl_inversion.data.scenario import ClassIncrementalScenario
from cl_inversion.inversion import InversionCallback
from cl_inversion.inversion.engine import EngineBase, SynthesisEngine, missing_members
from cl_inversion.loop.hooks import TaskContext
from cl_inversion.methods import ABD, Finetune
from cl_inversion.models import IncrementalClassifier, SmallCNN
from cl_inversion.utils.errors import ConfigError


class NoiseEngine(EngineBase):
    """The smallest engine: labelled noise, through the defaults of `EngineBase`."""

    name = "noise"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def setup(self, image_shape, pixel_range) -> None:
        self.calls.append("setup")
        super().setup(image_shape, pixel_range)

    def observe(self, teacher, real_batches, replay_images, replay_labels) -> None:
        self.calls.append("observe")

    def synthesize(self, teacher, classes, n):
        self.calls.append("synthesize")
        self.stats.full_model_passes = 1.0
        return torch.randn(n, *self.image_shape), torch.tensor(classes).repeat(n)[:n]


def student(cls=ABD):
    torch.manual_seed(0)
    return cls(IncrementalClassifier(SmallCNN(1, width=8)), optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def test_an_object_without_the_contract_is_refused_naming_what_it_lacks():
    class Half:
        name = "half"

        def synthesize(self, teacher, classes, n): ...

    assert missing_members(Half()) == ["stats", "setup", "observe", "replay", "state_dict", "load_state_dict"]
    with pytest.raises(ConfigError, match="Half is not a synthesis engine: it lacks stats, setup"):
        InversionCallback(Half())
    assert isinstance(NoiseEngine(), SynthesisEngine) and not missing_members(NoiseEngine())


def test_the_callback_runs_the_engine_in_order_and_hands_the_replay_to_the_student(tmp_path: Path):
    scenario = ClassIncrementalScenario(digits(), n_tasks=5)
    m = student()
    data = scenario.datamodule(0, 16)
    m.begin_task(0, 2, data)
    assert m.replay is None and set(m.loss(*next(iter(data.train_dataloader())))) == {"loss", "ce"}
    m.end_task(data)
    engine = NoiseEngine()
    callback = InversionCallback(engine, n_images=8, grid=False)
    bundle = scenario.dataset
    callback.between_tasks(m, TaskContext(0, tmp_path, None, data, bundle.image_shape, bundle.pixel_range(),
                                          bundle.mean, bundle.std, teacher=m.previous))
    assert engine.calls == ["setup", "observe", "synthesize"]
    images, labels = m.replay.sample(5)  # EngineBase's default replay: the synthesised buffer
    assert images.shape == (5, 1, 8, 8) and set(labels.tolist()) <= {0, 1}
    assert callback.history[0]["engine"] == "noise" and callback.history[0]["full_model_passes"] == 1.0
    m.begin_task(1, 2, scenario.datamodule(1, 16))
    x, y = next(iter(scenario.datamodule(1, 16).train_dataloader()))
    assert set(m.loss(x, y)) == {"loss", "local_ce", "head_ce", "feature_kd"}  # the replay loss now


def engines_of(cfg) -> list[str]:
    return [k for k, v in cfg.inversion.items() if hasattr(v, "keys")]


def test_a_method_config_chooses_its_engine_and_only_that_engine_is_composed(compose):
    assert {m: engines_of(compose([f"method={m}"])) for m in ("abd", "deepinversion", "rdfcil", "pmi", "remix")} == {
        "abd": ["generator"], "deepinversion": ["pixel"], "rdfcil": ["rdfcil_generator"], "pmi": ["per_layer"],
        "remix": ["remix"]}
    assert engines_of(compose(["method=lwf"])) == [] and not hasattr(student(Finetune), "receive_replay")
    assert engines_of(compose(["method=abd", "inversion/engine=pixel"])) == ["pixel"]
    assert engines_of(compose(["method=abd", "method.inversion=pixel"])) == ["pixel"]  # the older spelling
