"""`python -m cl_inversion [overrides]` / `cl-inversion [overrides]`."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from cl_inversion.config import register_configs
from cl_inversion.entry import REPO_CONFIG_DIR, config_dir, config_dir_missing_message, slurm_missing_message
from cl_inversion.errors import user_error

register_configs()
CONFIG_DIR = config_dir()  # absolute: a relative config_path breaks the console script (see cl_inversion.entry)


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


def main() -> None:
    problem = config_dir_missing_message() if CONFIG_DIR is None else slurm_missing_message(sys.argv[1:])
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
