"""Student variants on the first replayed task, from a finished run's task-0 checkpoint (its synthetic set
included): train task 1 with the overrides given, evaluate, no synthesis after it. A few minutes instead of a
whole run; the old classes are task 0's only.

    python docs/experiments/analysis/second_task.py <run dir> [--resynthesize] [override ...]
    (e.g. method.replay_augment=true)

`--resynthesize`: run the task-0 boundary again with the (overridden) engine settings instead of reusing the
checkpoint's synthetic set, for engine variants (the synthesis RNG differs from the run's: compare variants
with a `--resynthesize` run without overrides).
"""

import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cl_inversion.inversion.callback import InversionCallback
from cl_inversion.loop.checkpoints import load_resume_state, restore
from cl_inversion.loop.task_loop import TaskLoop, task_seed


def second_task(run: Path, overrides: list[str], resynthesize: bool = False) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(run / ".hydra" / "config.yaml"), OmegaConf.from_dotlist(overrides))
    with tempfile.TemporaryDirectory() as out:
        loop = TaskLoop(cfg, Path(out))
        loop.build()
        state, _ = load_resume_state(run / "checkpoints" / "task_0.ckpt")
        restore(loop.method, state, loop.callbacks)
        loop.logger = None
        method, t = loop.method, 1
        if resynthesize:
            for callback in loop.callbacks:
                if isinstance(callback, InversionCallback):
                    callback.images = callback.labels = None
                    callback.history = []
            L.seed_everything(task_seed(cfg.seed, 0), verbose=False)
            first = loop.scenario.datamodule(0, cfg.dataset.batch_size, cfg.dataset.num_workers,
                                             seed=task_seed(cfg.seed, 0))
            loop.call_hooks("between_tasks", loop.context(0, first, torch.device("cpu")))  # teacher: task 0's
            record = loop.results.extra["inversion"][-1]
            print(f"resynthesised: teacher accuracy {record['teacher_accuracy']:.1f}, feature distance "
                  f"{record['feature_distance']:.3f}, {record['wall_s']:.0f} s", flush=True)
        L.seed_everything(task_seed(cfg.seed, t), verbose=False)
        datamodule = loop.scenario.datamodule(t, cfg.dataset.batch_size, cfg.dataset.num_workers,
                                              cumulative=method.uses_all_data, seed=task_seed(cfg.seed, t))
        method.begin_task(t, len(loop.scenario.tasks[t].classes), datamodule, is_last=False)
        trainer = instantiate(cfg.trainer, logger=False, default_root_dir=out, callbacks=list(loop.callbacks),
                              enable_progress_bar=False, enable_model_summary=False)
        loop.train_task(t, trainer, datamodule, torch.device("cpu"))
        ev = loop.evaluate(t, datamodule, torch.device("cpu"))
    label = " ".join(overrides) or "(as run)"
    average = sum(ev.accuracy) / len(ev.accuracy)
    print(f"{run.name} {'--resynthesize ' if resynthesize else ''}{label}: after task 2 avg {average:.2f} "
          f"old {ev.old_class_accuracy:.2f} new {ev.new_class_accuracy:.2f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[2:]
    second_task(Path(sys.argv[1]), [a for a in args if a != "--resynthesize"], "--resynthesize" in args)
