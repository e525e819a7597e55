"""W&B through the real client in offline mode: runs, summary, accuracy-matrix table, one run per job.

The offline run's `.wandb` file is read back record by record (LevelDB log format of protobuf `Record`s;
wandb ≥ 0.2x no longer ships a Python reader, and offline runs write no files/wandb-summary.json).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from helpers import cli_env, read_results, run_cli

QUICK = ["logger=wandb", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "scenario.n_tasks=2"]


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


class OfflineRun:
    """What an offline run recorded: run metadata, merged summary, exit code, config, files."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.summary: dict = {}
        self.exit_code = None
        self.config: dict = {}
        for record in read_records(next(run_dir.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "config":
                self.config |= {item.key: json.loads(item.value_json) for item in record.config.update}
            elif kind == "exit":
                self.exit_code = record.exit.exit_code


def offline_runs(root: Path) -> list[OfflineRun]:
    return [OfflineRun(d) for d in sorted(root.rglob("offline-run-*")) if d.is_dir()]


def test_offline_run_has_summary_table_heatmap_and_config(tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env() | {"WANDB_MODE": "offline"}
    run_cli(*QUICK, "method=lwf", "logger.tags=[paper]", run_dir=run_dir, env=env)
    results = read_results(run_dir)
    (run,) = offline_runs(run_dir / "wandb")
    assert run.exit_code == 0
    assert run.summary["final_accuracy"] == results["final_accuracy"]
    assert run.summary["forgetting"] == results["forgetting"] and run.summary["status"] == "completed"
    assert "task_1/loss" in run.summary and "task_1/kd" in run.summary  # per-epoch, task-prefixed losses
    assert run.summary["eval/accuracy_task_1"] == results["accuracy_matrix"][1][1]
    assert set(run.run.tags) == {"paper", "method:lwf", "dataset:digits", "backbone:small_cnn"}
    assert run.run.project == "cl_inversion"
    assert run.config["method"]["temperature"] == 2.0  # resolved, nested config
    assert run.config["scheduler"]["T_max"] == 1  # ${trainer.max_epochs} was resolved
    table = json.loads((run.dir / "files" / run.summary["accuracy_matrix/path"]).read_text())
    assert table["columns"] == ["after_task", "task_0", "task_1"]
    assert table["data"] == [[0, results["accuracy_matrix"][0][0], None], [1, *results["accuracy_matrix"][1]]]
    (heatmap,) = (run.dir / "files").glob("media/images/accuracy_matrix_heatmap_*.png")
    assert heatmap.stat().st_size > 5000


def test_multirun_gives_one_wandb_run_per_job_grouped_by_sweep(tmp_path):
    """Basic launcher: both jobs run in one process, so each job must finish its W&B run (logger.offline)."""
    sweep = tmp_path / "my_sweep"
    env = cli_env()
    env.pop("WANDB_MODE")  # logger.offline=true alone must keep it offline
    run_cli("-m", *QUICK, "logger.offline=true", "method=finetune,lwf", f"hydra.sweep.dir={sweep}", env=env)
    runs = offline_runs(sweep)
    assert len(runs) == 2
    assert len({r.run.run_id for r in runs}) == 2
    assert [r.run.run_group for r in runs] == ["my_sweep", "my_sweep"]
    for run, method in zip(runs, ("finetune", "lwf")):
        assert run.exit_code == 0 and f"method:{method}" in run.run.tags
        job_dir = run.dir.parent.parent
        assert run.summary["final_accuracy"] == read_results(job_dir)["final_accuracy"]
    assert "task_1/kd" not in runs[0].summary  # finetune's run did not receive lwf's metrics


def test_failed_job_finishes_its_wandb_run_as_failed(tmp_path):
    run_dir = tmp_path / "run"
    # an invalid Trainer value fails inside the task loop, after the W&B run started
    proc = run_cli(*QUICK, "+trainer.max_steps=-5", run_dir=run_dir, check=False)
    assert proc.returncode != 0
    assert read_results(run_dir)["status"] == "failed"
    (run,) = offline_runs(run_dir / "wandb")
    assert run.exit_code == 1 and run.summary["status"] == "failed"


def test_log_image_reaches_wandb_and_tensorboard(tmp_path):
    import wandb
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cl_inversion.report.plots import accuracy_heatmap
    from cl_inversion.utils.logging_utils import log_image

    png = accuracy_heatmap([[90.0], [40.0, 95.0]], tmp_path / "grid.png", title="grid")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    tb = TensorBoardLogger(str(tmp_path), name="tb", version="")
    try:
        took = log_image([wb, tb, CSVLogger(str(tmp_path))], "synthetic/grid", png, step=3, caption="task 1")
        tb.experiment.flush()
    finally:
        wandb.finish()
    assert took == ["wandb", "tensorboard"]
    for _ in range(60):  # in-process, wandb-core may still be writing the offline file after finish()
        (run,) = offline_runs(tmp_path / "wandb")
        if run.exit_code is not None:
            break
        time.sleep(0.5)
    assert run.summary.get("synthetic/grid/captions") == ["task 1"], (run.summary, run.exit_code)
    assert list((run.dir / "files" / "media" / "images").rglob("*.png"))
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    (image,) = events.Images("synthetic/grid")
    assert image.step == 3 and image.width > 100
