"""The task loop and what it owns: for each task a fresh `Trainer.fit`, the between-task hooks (synthesis),
evaluation on every task seen so far, the record (results.json, loggers) and a checkpoint.

- `task_loop.py` — `TaskLoop`, one experiment step by step.
- `hooks.py` — `TaskContext` (what a hook sees), the `Student` protocol (what a hook may use of the method),
  `ContinualCallback` (a Lightning callback with the loop's hooks) and the finite-loss guard.
- `checkpoints.py` — what a checkpoint holds, finding and restoring one, the random state.
- `run_dir.py` — the run directory: claiming it, Hydra's record in it, a failed run's status.
- `results.py`, `metrics.py` — the accuracy matrices and what is computed from them.
- `zero_shot.py` — CLIP's zero-shot retention on held-out classes, as a `ContinualCallback`.
"""
