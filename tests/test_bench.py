"""The benchmark harness runs and reports (no timing assertion: this machine's load varies)."""

import json

from benchmarks import run_all


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


def test_inversion_speed_reports_both_engines_and_speedups():
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks.inversion_speed", "--quick", "--images", "32"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("speedup_passes", "speedup_wall", "deepinversion", "pmi", "target", "speedup_passes_accuracy"):
        assert key in result
    assert result["deepinversion"]["passes"] > 0
    assert 0 < result["pmi_per_layer_passes"] <= 50  # 50 steps per block, each at its FLOP share
    assert result["pmi_feature_model_s"] > 0  # the boundary's feature model, timed apart
    real = result["real_batch"]  # the same measures on real test images, for scale
    assert 50 < real["teacher_accuracy"] <= 100 and real["bn_distance"] > 0
    # ablations on the same targets: no per-layer phase (full steps only), and real images as the start
    ablations = result["ablations"]
    assert ablations["pmi_without_per_layer"]["end"]["passes"] == result["pmi_end"]["step"]
    assert ablations["pmi_from_real_images"]["end"]["passes"] == result["pmi_end"]["step"]
    assert result["pmi_end"]["passes"] > result["pmi_end"]["step"]  # the per-layer passes come on top
    start = result["pmi_start"]  # the per-layer image, before the first full-model step
    assert start["step"] == 0 and abs(start["passes"] - result["pmi_per_layer_passes"]) < 1e-6
    assert len(result["pmi_block_relative_errors"]) == 3  # small CNN: stem + 2 stages
    assert result["pmi_start_feature_error"] > 0 and ablations["pmi_from_real_images"]["start_feature_error"] > 0


def test_synthesis_speed_reports_every_engine_and_option_ratio():
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks.synthesis_speed", "--steps", "1", "--rounds", "1",
                           "--batch", "10"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["engines"]) == {"pixel", "generator", "per_layer"} and result["threads"] == 1
    for name, engine in result["engines"].items():
        assert engine["ms_per_step"] > 0 and engine["images_per_s"] > 0
        expected = {"before", "bf16-mixed"} | ({"channels_last"} if name != "per_layer" else set())
        assert set(engine["options"]) == expected and all(r > 0 for r in engine["options"].values())
