"""Replay options of every inversion student: `replay_augment` (each replayed synthetic image is a crop of its
zero-padded self, maybe flipped) and `replay_ratio` (synthetic images per real image)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import run_in_process, student_at_second_task

from cl_inversion.inversion.replay import BufferReplay
from cl_inversion.methods import PMI, DeepInversion
from cl_inversion.methods.inversion_student import crop_flip_batch
from cl_inversion.utils.errors import user_error


def test_crop_flip_batch_is_a_per_image_crop_of_the_padded_image_or_its_mirror():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    out = crop_flip_batch(x, 2)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    shifts_seen, flips_seen = set(), 0
    for i in range(len(x)):
        crops = {(top, left): padded[i, :, top : top + 16, left : left + 16] for top in range(5) for left in range(5)}
        matches = [(*at, flip) for at, crop in crops.items() for flip in (False, True)
                   if torch.equal(out[i], crop.flip(-1) if flip else crop)]
        assert matches, f"image {i} is not a crop of its padded image"
        shifts_seen.add(matches[0][:2])
        flips_seen += matches[0][2]
    assert len(shifts_seen) > 5 and 10 < flips_seen < 54  # offsets and flips drawn per image, not per batch


def test_students_sample_augmented_replay_only_when_asked():
    images, labels = torch.randn(20, 1, 8, 8), torch.arange(4).repeat(5)
    for cls in (DeepInversion, PMI):
        plain, augmented = (student_at_second_task(cls, replay_augment=flag) for flag in (False, True))
        for m in (plain, augmented):
            m.receive_replay(BufferReplay(images, labels))
        torch.manual_seed(1)
        x, y = plain.sample_replay(32)
        assert any(torch.equal(x[0], im) for im in images)
        torch.manual_seed(1)
        xa, ya = augmented.sample_replay(32)
        assert torch.equal(ya, y)
        assert not torch.equal(xa, x)
        assert augmented.replay_loss(torch.randn(8, 1, 8, 8), torch.tensor([4, 5] * 4))["loss"].isfinite()


def test_replay_augment_is_a_method_option_of_the_config(tmp_path):
    ok = run_in_process("method=deepinversion", "method.replay_augment=true", "scenario.n_tasks=2",
                        "trainer.max_epochs=1", "inversion.n_images=16", "inversion.pixel.steps=2", "logger=none",
                        run_dir=tmp_path / "ok")
    assert ok["status"] == "completed"
    with pytest.raises(Exception) as bad:
        run_in_process("method=deepinversion", "method.replay_augment=maybe", run_dir=tmp_path / "bad")
    assert "method.replay_augment" in str(user_error(bad.value))  # the one line the CLI prints


def test_replay_ratio_sets_the_synthetic_images_drawn_per_real_image():
    images, labels = torch.randn(20, 1, 8, 8), torch.arange(4).repeat(5)
    for ratio, expected in ((1.0, 32), (2.0, 64), (0.5, 16)):
        student = student_at_second_task(PMI, replay_ratio=ratio)
        student.receive_replay(BufferReplay(images, labels))
        x, y = student.sample_replay(32)
        assert len(x) == len(y) == expected
        assert student.replay_loss(torch.randn(8, 1, 8, 8), torch.tensor([4, 5] * 4))["loss"].isfinite()


def test_replay_ratio_is_a_method_option_of_the_config(tmp_path):
    ok = run_in_process("method=pmi", "method.replay_ratio=2", "scenario.n_tasks=2", "trainer.max_epochs=1",
                        "inversion.n_images=16", "inversion.per_layer.layer_steps=2",
                        "inversion.per_layer.full_steps=2", "logger=none", run_dir=tmp_path / "ok")
    assert ok["status"] == "completed"
    with pytest.raises(Exception) as bad:
        run_in_process("method=abd", "method.replay_ratio=0", run_dir=tmp_path / "bad")
    assert "method.replay_ratio" in str(user_error(bad.value))  # the one line the CLI prints


def test_abd_class_balance_gives_each_class_an_equal_share_whatever_the_replay_ratio():
    from cl_inversion.methods import ABD

    student = student_at_second_task(ABD)  # 4 old classes, 2 new
    n_old, n_seen = student.n_old, student.n_seen
    half = torch.cat([torch.tensor([4, 5] * 8), torch.arange(4).repeat(4)])
    weights = student.class_balance(half)  # ABD's half real, half synthetic batch: its own weights, unchanged
    assert torch.equal(weights, torch.where(half < n_old, n_old / n_seen, 1 - n_old / n_seen))
    for targets in (half, torch.cat([torch.tensor([4, 5] * 8), torch.arange(4).repeat(8)])):  # ratio 1 and 2
        w = student.class_balance(targets)
        per_class = torch.stack([w[targets == c].sum() for c in range(n_seen)])
        assert torch.allclose(per_class, per_class.mean().expand(n_seen)), per_class
