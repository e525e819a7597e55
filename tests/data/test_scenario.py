import pytest
import torch

from cl_inversion.data import ClassIncrementalScenario, class_order_for, digits, task_sizes
from cl_inversion.data.scenario import all_targets
from cl_inversion.utils.errors import ConfigError


@pytest.fixture(scope="module")
def bundle():
    return digits()


def test_digits_split_is_stratified_and_normalised(bundle):
    assert len(bundle.train) + len(bundle.test) == 1797
    counts = torch.bincount(bundle.test.targets, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # 25% of ~180 per class
    x, _ = bundle.train[0]
    assert x.shape == (1, 8, 8)
    images = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    assert abs(images.mean().item()) < 1e-3 and abs(images.std().item() - 1) < 1e-2


def test_class_order_matches_python_random_shuffle():
    import random

    expected = list(range(100))
    random.seed(1)
    random.shuffle(expected)
    assert class_order_for(100, 1) == expected
    assert class_order_for(10, 0) != class_order_for(10, 1)
    assert class_order_for(10, None) == list(range(10))


def test_equal_tasks_are_disjoint_cover_all_and_remap_labels(bundle):
    sc = ClassIncrementalScenario(bundle, n_tasks=5, class_order_seed=0)
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    originals = [c for t in sc.tasks for c in t.original_classes]
    assert sorted(originals) == list(range(10)) and originals == sc.class_order
    seen = set()
    for t in range(5):
        labels = set(all_targets(sc.train_set(t)).tolist())
        assert labels == set(sc.tasks[t].classes)
        assert not labels & seen
        seen |= labels
        assert set(all_targets(sc.test_set(t)).tolist()) == labels
    # a remapped label still points at the right images: label 0 holds class_order[0]'s images
    first = sc.train_set(0).indices[0]
    assert bundle.train.targets[first].item() in sc.tasks[0].original_classes
    total = sum(len(sc.train_set(t)) for t in range(5))
    assert total == len(bundle.train)
    assert len(sc.train_set(2, cumulative=True)) == sum(len(sc.train_set(t)) for t in range(3))


def test_first_task_larger(bundle):
    assert task_sizes(100, 6, 50) == [50, 10, 10, 10, 10, 10]
    sc = ClassIncrementalScenario(bundle, n_tasks=3, first_task_classes=4)
    assert [len(t.classes) for t in sc.tasks] == [4, 3, 3]


@pytest.mark.parametrize("n_tasks,first,match", [
    (0, None, "scenario.n_tasks=0"), (11, None, "scenario.n_tasks=11"), (3, None, "does not divide"),
    (3, 5, "first_task_classes=5"), (2, 10, "first_task_classes=10"),
])
def test_bad_splits_name_the_field(n_tasks, first, match):
    with pytest.raises(ConfigError, match=match):
        task_sizes(10, n_tasks, first)


def test_shuffle_classes_false_keeps_the_natural_order_for_any_seed(compose, bundle):
    from cl_inversion.run import build_scenario

    for seed in (0, 3):
        natural = build_scenario(compose([f"seed={seed}", "scenario.shuffle_classes=false"]), bundle)
        assert natural.class_order == list(range(10))
    assert build_scenario(compose(["seed=3"]), bundle).class_order == class_order_for(10, 3) != list(range(10))


def test_digits_color_jitter_changes_training_images_only():
    plain, jittered = digits(), digits(color_jitter=True)
    torch.manual_seed(0)
    assert not torch.equal(jittered.train[0][0], plain.train[0][0])
    assert torch.equal(jittered.test[0][0], plain.test[0][0])
