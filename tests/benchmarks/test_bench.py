"""The benchmark harness runs and reports (no timing assertion: this machine's load varies)."""

import json

import pytest

from benchmarks import run_all

pytestmark = pytest.mark.slow  # each benchmark in a subprocess: make test-full (and CI)


def test_loop_overhead_json_through_run_all(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.loop_overhead --steps 1 --rounds 1` in a subprocess: its last stdout line is the
    JSON that run_all stores (atomically); an absent benchmark module is skipped."""
    monkeypatch.setattr(run_all, "BENCHMARKS", {"loop_overhead": ["--steps", "1", "--rounds", "1"],
                                                "no_such_benchmark": []})
    assert run_all.main(["--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "loop_overhead.json").read_text())
    assert result["framework_s"] > 0 and result["raw_s"] > 0 and result["ratio"] > 0
    assert result["steps"] == 1 and result["trainer"]["max_epochs"] == 1
    assert not (tmp_path / "no_such_benchmark.json").exists() and not list(tmp_path.glob("*.tmp"))
    assert "no_such_benchmark: skipped" in capsys.readouterr().out


def test_last_json_line():
    assert run_all.last_json('progress\n{"ratio": 1.0}\n') == {"ratio": 1.0}


def _inversion_speed(*flags: str) -> dict:
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks.inversion_speed", "--threads", "1", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


ARMS = ("deepinversion", "pmi", "pmi_without_per_layer", "pmi_from_real_images")


def _arms(result: dict) -> dict:
    return {"deepinversion": result["deepinversion"], "pmi": result["pmi"], **result["ablations"]}


def _check_criterion_and_distillation(result: dict) -> None:
    """The criterion is DeepInversion's end (accuracy >=, Fréchet distance <=); an arm's `reached` point meets
    it, its speedups and at-criterion distillation exist exactly when it does; students score in [0, 100]."""
    crit = result["criterion"]
    assert set(crit["figures"]) == {"teacher_accuracy", "feature_distance"}
    assert crit["diagnostic_only"] == ["bn_distance"]
    di_end = result["deepinversion"]["end"]
    assert crit["teacher_accuracy"] == di_end["teacher_accuracy"]
    assert crit["feature_distance"] == di_end["feature_distance"] > 0
    arms = _arms(result)
    assert set(arms) == set(ARMS)
    assert arms["deepinversion"]["reached"]["passes"] <= di_end["passes"]  # it meets its own end values
    for name, arm in arms.items():
        reached, distill = arm["reached"], arm["distillation_accuracy"]
        assert 0 <= distill["end"] <= 100
        assert arm["start"]["step"] == 0 and arm["end"]["step"] >= (reached or arm["end"])["step"]
        if reached is None:
            assert distill["at_criterion"] is None
        else:
            assert reached["teacher_accuracy"] >= crit["teacher_accuracy"]
            assert reached["feature_distance"] <= crit["feature_distance"]
            assert 0 <= distill["at_criterion"] <= 100
        if name != "deepinversion":
            expected = None if reached is None or not reached["passes"] else (
                arms["deepinversion"]["reached"]["passes"] / reached["passes"])
            assert arm["speedup_passes"] == expected
            assert (arm["speedup_wall"] is None) == (expected is None)
    assert result["speedup_passes"] == result["pmi"]["speedup_passes"]
    assert result["speedup_wall"] == result["pmi"]["speedup_wall"]


def test_inversion_speed_reports_both_engines_and_speedups():
    """Digits, CNN teacher, tiny budgets: every arm's criterion figures, speedups and distillation accuracy."""
    result = _inversion_speed("--quick", "--images", "40", "--di-steps", "60", "--distill-steps", "40",
                              "--pmi-set", "full_steps=60")
    assert result["teacher"] == "cnn" and result["dataset"] == "digits" and result["n_images"] == 40
    assert result["teacher_info"]["test_accuracy"] > 80  # the small CNN learns the digits in 7 epochs
    _check_criterion_and_distillation(result)
    # a student distilled on real training images beats chance by far: the distillation measures something
    assert result["distillation"]["real_train_images_accuracy"] > 50
    assert 0 < result["pmi_per_layer_passes"] <= 50  # 50 steps per block (PMI's), each at its FLOP share
    assert result["pmi_feature_model_s"] > 0  # the boundary's feature model, timed apart
    real = result["real_test_batch"]  # the same measures on real test images, for scale
    assert 50 < real["teacher_accuracy"] <= 100 and real["bn_distance"] > 0 and real["feature_distance"] > 0
    # ablations on the same targets: no per-layer phase (full steps only), and real images as the start
    ablations = result["ablations"]
    assert ablations["pmi_without_per_layer"]["end"]["passes"] == result["pmi"]["end"]["step"] == 60
    assert ablations["pmi_from_real_images"]["end"]["passes"] == 60
    assert result["pmi"]["end"]["passes"] > result["pmi"]["end"]["step"]  # the per-layer passes come on top
    start = result["pmi"]["start"]  # the per-layer image, before the first full-model step
    assert start["step"] == 0 and abs(start["passes"] - result["pmi_per_layer_passes"]) < 1e-6
    assert len(result["pmi_block_errors"]) == 3  # small CNN: stem + 2 stages
    assert all(best <= first for first, best in result["pmi_block_errors"])
    assert result["pmi_start_feature_error"] > 0 and result["from_real_start_feature_error"] > 0
    assert result["deepinversion"]["end"]["bn_distance"] > 0  # a diagnostic, still reported


def test_inversion_speed_vit_teacher():
    """`--teacher vit` (clip_small, an open_clip ViT trained in the benchmark; digits keeps it local and fast):
    no BatchNorm, per-layer inversion walks stem + 4 transformer blocks + pool, same figures per arm."""
    result = _inversion_speed("--quick", "--teacher", "vit", "--dataset", "digits", "--teacher-epochs", "6",
                              "--images", "30", "--di-steps", "30", "--distill-steps", "20",
                              "--pmi-set", "layer_steps=5", "--pmi-set", "full_steps=30")
    assert result["teacher"] == "vit" and result["backbone"] == "clip_small"
    assert result["teacher_info"]["test_accuracy"] > 30  # trained here from random init (chance: 10 %)
    _check_criterion_and_distillation(result)
    assert len(result["pmi_block_errors"]) == 6  # stem, 4 residual blocks, pool
    for arm in _arms(result).values():
        assert arm["end"]["bn_distance"] is None  # a ViT has no BN statistics
    assert any("no BatchNorm" in note for note in result["notes"])


def test_inversion_speed_vit_per_layer_arm_alone():
    """`--vit-per-layer only`: PMI's CLIP per-block engine on the trained ViT, tiny budgets; a reconstruction error
    (first step, kept iterate) for each block from `start_block` up, and the seconds per class."""
    # the start block's input is tokens here: the published upsampling (step 300) and input TV do not apply
    tiny = ["layer_steps=3", "start_steps=302", "full_steps=2", "contrastive_epochs=2", "per_class=3",
            "boost_rate=2", "start_block=2"]
    result = _inversion_speed("--quick", "--teacher", "vit", "--dataset", "digits", "--teacher-epochs", "1",
                              "--vit-per-layer", "only", *[f for item in tiny for f in ("--vit-set", item)])
    arm = result["vit_per_layer"]
    assert "deepinversion" not in result and arm["settings"]["statistics"] == "data"
    assert arm["n_images"] == 30 and arm["pool_shape"][0] == 30  # 3 per class, inputs of block 2: tokens
    assert list(arm["block_mse"]) == ["2", "3", "4", "5"]  # stem, 4 residual blocks, pool: from block 2 up
    assert all(b["kept"] <= b["first"] for b in arm["block_mse"].values())  # blocks above the start keep their best
    assert arm["seconds_per_class"] > 0 and arm["synthesis_s"] > 0 and arm["feature_relative_error"] > 0


def test_synthesis_speed_reports_every_engine_and_option_ratio():
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks.synthesis_speed", "--steps", "1", "--rounds", "1",
                           "--batch", "10"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["engines"]) == {"pixel", "generator", "per_layer"} and result["threads"] == 1
    for name, engine in result["engines"].items():
        assert engine["ms_per_step"] > 0 and engine["images_per_s"] > 0
        expected = {"before", "bf16-mixed"} | ({"channels_last"} if name != "per_layer" else set())
        assert set(engine["options"]) == expected and all(r > 0 for r in engine["options"].values())
        plan = engine["boundary"]  # the preset's boundary: eager time, what auto chooses there (CPU)
        assert plan["eager_s"] > 0 and plan["auto_compiles"] is True and engine["compile_s"] == {}
        assert plan["auto_arm"] == "compiled"  # on CUDA: compiled+graphed (cuda_graph: auto)


def test_covariance_memory_reports_stored_bytes_fit_and_nll_per_width():
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks.covariance_memory", "--quick", "--channels", "8", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [r["channels"] for r in rows] == [8, 16]
    for r in rows:
        c = r["channels"]
        assert r["laplace_stored_bytes"] == 12 * c and r["dense_stored_bytes"] == 4 * (c + c * c)
        assert r["laplace_fit_s"] > 0 and r["laplace_nll_ms"] > 0 and r["dense_nll_ms"] > 0
        assert r["laplace_nll"] == r["laplace_nll"] and r["dense_nll"] == r["dense_nll"]  # finite, not NaN


@pytest.mark.parametrize("preset", ["abd_cifar100_10t", "pmi_cifar100_10t", "rdfcil_cifar100_10t"])
def test_the_cifar100_stand_in_takes_every_dataset_option_of_the_presets(preset):
    """benchmarks/device_check.sh runs these presets on the random-pixel stand-in: it must accept what they set."""
    from cl_inversion.build import LOADER_KEYS, compose
    from cl_inversion.utils.validate import validate_config

    cfg = compose([f"experiment={preset}", "dataset._target_=benchmarks.stand_in_data.cifar100_shaped"])
    validate_config(cfg, {"dataset": {k: int for k in LOADER_KEYS}})
