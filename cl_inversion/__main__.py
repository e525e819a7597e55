"""`python -m cl_inversion [overrides]` / `cl-inversion [overrides]`."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from cl_inversion.config import register_configs
from cl_inversion.errors import ConfigError
from cl_inversion.io import CorruptCheckpointError

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from cl_inversion.run import run

    try:
        try:
            results = run(cfg)
        except InstantiationException as err:  # a ConfigError raised while building a `_target_`
            if isinstance(err.__cause__, ConfigError):
                raise err.__cause__ from None
            raise
    except (ConfigError, CorruptCheckpointError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode.name == "MULTIRUN":
            raise
        print(f"cl-inversion: error: {err}", file=sys.stderr)
        sys.exit(2)
    return results.get("final_accuracy")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
