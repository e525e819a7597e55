"""The last lines of a multirun: how many jobs completed or failed, and where each failed one is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

SWEEP: dict[str, Path] = {}  # set in the launching process by `RememberSweepDir`


class RememberSweepDir(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): records the sweep directory at multirun start, so
    the entry point can summarise the jobs even when one failed (Hydra then skips `on_multirun_end`)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        SWEEP["dir"] = Path(str(config.hydra.sweep.dir))


def summary(sweep_dir: Path) -> str:
    runs = sorted(p.parent for p in Path(sweep_dir).glob("*/results.json"))
    done, failed = [], []
    for run in runs:
        try:
            status = json.loads((run / "results.json").read_text()).get("status")
        except (OSError, ValueError):
            status = "unreadable"
        (done if status == "completed" else failed).append((run, status))
    lines = [f"sweep {sweep_dir}: {len(done)} of {len(runs)} jobs completed"
             + (f", {len(failed)} not: " + "; ".join(f"{run.name} ({status})" for run, status in failed)
                if failed else "")
             + f" | python -m cl_inversion.report {sweep_dir}"]
    return "\n".join(lines)


def print_summary() -> None:
    sweep_dir = SWEEP.get("dir")
    if sweep_dir is not None and sweep_dir.is_dir():
        print(summary(sweep_dir), flush=True)
