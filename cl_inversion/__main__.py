"""`python -m cl_inversion [overrides]` / `cl-inversion [overrides]`."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from cl_inversion.cli.entry import (
    REPO_CONFIG_DIR,
    config_dir,
    config_dir_missing_message,
    engine_alias,
    slurm_missing_message,
)
from cl_inversion.utils.config import register_configs
from cl_inversion.utils.errors import user_error

register_configs()
CONFIG_DIR = config_dir()  # absolute: a relative config_path breaks the console script (see cl_inversion.cli.entry)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR or REPO_CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from cl_inversion.run import run

    try:
        results = run(cfg)
    except Exception as err:
        error = user_error(err)  # a bad config or input, possibly wrapped by Hydra's instantiate
        if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.get().mode.name == "MULTIRUN":
            # Hydra records the failure for this job, runs the remaining ones and prints this one
            # compactly (UserError is a CompactHydraException); sys.exit here would end the sweep.
            raise error from None
        print(f"cl-inversion: error: {error}", file=sys.stderr)
        sys.exit(2)
    return results.get("final_accuracy")


#: config groups composed automatically (a profile's engine budgets, the smoke add-on, preset bases): not in --help
INTERNAL_GROUPS = ("budget", "smoke", "experiment/base", "method/base")


def help_text(config_dir: str | os.PathLike) -> str:
    """`--help`: what a user picks, without the groups the defaults list composes by itself."""
    from pathlib import Path

    root = Path(config_dir)
    groups = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        name = folder.relative_to(root).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options and not name.startswith(INTERNAL_GROUPS):
            groups[name] = options
    lines = ["cl-inversion: data-free continual learning experiments (Hydra overrides: group=option key=value)",
             "", "  cl-inversion method=abd dataset=digits seed=1",
             "  cl-inversion -m method=abd,pmi seed=0,1,2 hydra/launcher=local      # a sweep",
             "  cl-inversion experiment=abd_cifar100_10t +smoke=digits              # a paper preset, in seconds",
             "", "== Configuration groups =="]
    lines += [f"{name}: {', '.join(options)}" for name, options in groups.items()]
    lines += ["", "Keys of the composed config: cl-inversion --cfg job [overrides]; Hydra's own flags: --hydra-help"]
    return "\n".join(lines)


def main() -> None:
    problem = config_dir_missing_message() if CONFIG_DIR is None else slurm_missing_message(sys.argv[1:])
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = engine_alias(sys.argv[1:])
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text(CONFIG_DIR))
        return
    from cl_inversion.cli.sweep_summary import print_summary

    try:
        _hydra_main()
    finally:  # a multirun ends with its jobs' tally (also when a job failed and Hydra exits non-zero)
        print_summary()


if __name__ == "__main__":
    main()
