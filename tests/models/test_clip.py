"""CLIP backbones through open_clip, on the shipped random-init `clip_tiny` (no download anywhere)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import read_results

from cl_inversion.data import ClassIncrementalScenario, digits
from cl_inversion.methods.finetune import Finetune
from cl_inversion.models import ClipBackbone, IncrementalClassifier, SmallCNN
from cl_inversion.models.clip import register_clip_configs
from cl_inversion.utils.errors import ConfigError

CLIP_RUN = ["backbone=clip_tiny", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
            "checkpoint=false"]


@pytest.fixture(scope="module")
def bundle():
    return digits()


def tiny(**kwargs) -> ClipBackbone:
    return ClipBackbone("clip_tiny", in_channels=kwargs.pop("in_channels", 1), **kwargs)


def check_zero_shot_run(res: dict) -> None:
    assert res["status"] == "completed" and len(res["accuracy_matrix"]) == 4
    zs = res["zero_shot_accuracy"]
    assert len(zs) == 4 + 1 and all(isinstance(a, float) and 0 <= a <= 100 for a in zs)
    held = res["zero_shot_classes"]
    assert len(held) == 2 and held == res["class_order"][-2:]
    trained = {c for task in res["per_task"] for c in task["classes"]}
    assert trained.isdisjoint(held) and len(trained) == 8


@pytest.mark.slow
def test_clip_tiny_cli_run_with_zero_shot_retention(cli, tmp_path):
    cli(*CLIP_RUN, "method=finetune", "scenario.n_tasks=4", "scenario.holdout_classes=2", run_dir=tmp_path)
    check_zero_shot_run(read_results(tmp_path))


def test_clip_tiny_lwf_and_default_scenario_in_process(compose, tmp_path, caplog):
    """LwF (teacher snapshot of a CLIP backbone) through the same `run`; without held-out classes the
    list still has one entry per point, null, and a warning says how to get numbers."""
    from cl_inversion.run import run

    check_zero_shot_run(run(compose([*CLIP_RUN, "method=lwf", "scenario.n_tasks=4", "scenario.holdout_classes=2"]),
                            run_dir=tmp_path / "lwf"))
    res = run(compose([*CLIP_RUN, "method=finetune", "+trainer.limit_train_batches=2"]), run_dir=tmp_path / "default")
    assert res["zero_shot_accuracy"] == [None] * (5 + 1) and res["zero_shot_classes"] == []
    assert "scenario.holdout_classes" in caplog.text


@pytest.mark.parametrize("override, needle", [
    ("backbone.model_name=ViT-B-33", "is not an open_clip model; did you mean ViT-B-32"),
    ("backbone.pretrained=/no/such/weights.pt", "neither an existing weights file nor a pretrained tag"),
])
def test_bad_model_name_or_weights_path_is_one_line_error(cli, tmp_path, override, needle):
    proc = cli(*CLIP_RUN, override, run_dir=tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cl-inversion: error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout and "Error executing job" not in proc.stderr


def test_local_weights_file_gives_identical_model(tmp_path):
    import open_clip

    register_clip_configs()
    torch.manual_seed(123)
    reference = open_clip.create_model("clip_tiny").eval().requires_grad_(False)  # same attention path
    path = tmp_path / "clip_tiny_weights.pt"
    torch.save(reference.state_dict(), path)

    loaded, fresh = tiny(pretrained=str(path)).eval(), tiny().eval()
    x = torch.randn(4, 1, 8, 8)
    ref_visual = reference.visual.state_dict()
    assert all(torch.equal(v, ref_visual[k.removeprefix("visual.")])
               for k, v in loaded.state_dict().items() if k.startswith("visual."))
    expected = reference.encode_image(loaded.preprocess(x))
    assert torch.equal(loaded(x), expected)
    assert not torch.allclose(fresh(x), expected)
    names = ["zero", "one"]
    text = open_clip.build_zero_shot_classifier(reference, open_clip.get_tokenizer("clip_tiny"),
                                                [f"a photo of a {n}." for n in names], ["{}"]).T
    only_first = ClipBackbone("clip_tiny", pretrained=str(path), templates=["a photo of a {name}."])
    assert torch.allclose(only_first.text_embeddings(names), text)


def test_head_slices_start_as_normalised_text_embeddings(bundle):
    scenario = ClassIncrementalScenario(bundle, n_tasks=4, class_order_seed=0, holdout_classes=2)
    backbone = tiny()
    method = Finetune(IncrementalClassifier(backbone), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert method.net.head.cosine and method.net.head.logit_scale == pytest.approx(1 / 0.07)

    dm0 = scenario.datamodule(0, 32)
    method.begin_task(0, 2, dm0)
    w0 = method.net.head.slices[0].weight.detach().clone()
    assert dm0.task_class_names == [scenario.class_names[i] for i in scenario.tasks[0].classes]
    assert torch.allclose(w0, backbone.text_embeddings(dm0.task_class_names))
    assert torch.allclose(w0.norm(dim=1), torch.ones(2))

    dm1 = scenario.datamodule(1, 32)
    method.begin_task(1, 2, dm1)
    assert torch.equal(method.net.head.slices[0].weight, w0)
    assert torch.allclose(method.net.head.slices[1].weight, backbone.text_embeddings(dm1.task_class_names))

    # logits are CLIP's: scale × cosine(image embedding, class text embedding)
    x = torch.stack([scenario.train[i][0] for i in range(3)])
    method.net.eval()
    expected = 1 / 0.07 * F.normalize(backbone(x), dim=-1) @ backbone.text_embeddings(
        dm0.task_class_names + dm1.task_class_names).T
    assert torch.allclose(method.net(x), expected, atol=1e-4)
    # input normalisation was taken from the dataset at task start
    assert torch.allclose(backbone.input_mean.flatten(), torch.tensor(bundle.mean))


def test_blocks_walk_the_vit_and_compose_to_forward():
    for channels, size in [(1, 8), (3, 32), (3, 20)]:
        backbone = tiny(in_channels=channels).eval()
        x = torch.randn(2, channels, size, size)
        h = x
        blocks = backbone.blocks()
        for block in blocks:
            h = block(h)
        assert h.shape == (2, backbone.feature_dim) == (2, 32)
        assert torch.allclose(h, backbone(x), atol=1e-6)
    assert len(blocks) == 1 + 2 + 1  # stem, two residual blocks, ln_post + projection
    assert blocks[1] is backbone.visual.transformer.resblocks[0]
    assert backbone.has_batchnorm is False and SmallCNN(1).has_batchnorm is True
    # inputs stay differentiable through the resize / channel / normalisation handling (inversion)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    backbone(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_trainable_parts_and_text_tower_outside_the_module_tree():
    frozen, last1, full = tiny(trainable="frozen"), tiny(trainable=1), tiny(trainable="all")
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in full.parameters())
    trainable = {n for n, p in last1.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in trainable)
    assert {"visual.proj", "visual.ln_post.weight"} <= trainable and "visual.conv1.weight" not in trainable
    with pytest.raises(ConfigError, match="backbone.trainable"):
        tiny(trainable=5)
    # the text tower is not trained, not checkpointed and shared (not copied) by teacher snapshots
    assert all(k.startswith("visual.") or k.startswith(("clip_", "input_")) for k in full.state_dict())
    teacher = copy.deepcopy(full)
    assert teacher._text is full._text and teacher.visual is not full.visual


def test_holdout_classes_never_enter_a_task(bundle):
    by_count = ClassIncrementalScenario(bundle, n_tasks=4, class_order_seed=3, holdout_classes=2)
    assert by_count.holdout_labels == [8, 9] and by_count.holdout_classes == by_count.class_order[-2:]
    by_ids = ClassIncrementalScenario(bundle, n_tasks=2, class_order_seed=3, holdout_classes=[0, 5])
    assert by_ids.holdout_classes == [0, 5] and by_ids.class_order[-2:] == [0, 5]
    assert all(c not in (0, 5) for t in by_ids.tasks for c in t.original_classes)
    held_test = by_ids.holdout_test_set()
    assert set(by_ids.test.targets[held_test.indices].tolist()) == {8, 9}
    with pytest.raises(ConfigError, match="holdout_classes=2 of the 10 are held out"):
        ClassIncrementalScenario(bundle, n_tasks=5, holdout_classes=2)
    with pytest.raises(ConfigError, match="scenario.holdout_classes"):
        ClassIncrementalScenario(bundle, n_tasks=1, holdout_classes=10)
