"""What the CLI settles before Hydra starts: where the config tree is, and launchers this machine lacks.

Config tree. `hydra.main(config_path="../conf")` is resolved against the *file* of the task function
only when it runs as `__main__` (`python -m cl_inversion`); the `cl-inversion` console script imports
`cl_inversion.__main__` as a module, and Hydra then reads the path as the package `pkg://conf`, which
exists nowhere ("Primary config module 'conf' not found"). So the CLI hands Hydra an absolute path:
the checkout's `conf/` (beside the package: editable installs, `python -m` in the repo), else the copy
a wheel installs to `<prefix>/share/cl_inversion/conf` (pyproject's `[tool.setuptools.data-files]`).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import sysconfig
from collections.abc import Sequence
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # cl_inversion/ (this file is cl_inversion/cli/entry.py)
REPO_CONFIG_DIR = PACKAGE_DIR.parent / "conf"
INSTALLED_CONFIG_DIR = Path("share", "cl_inversion", "conf")  # relative to the install scheme's data dir
SLURM_COMMANDS = ("sbatch", "srun")  # submitit's SLURM executor needs both


def _is_config_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def _installed_config_dirs() -> list[Path]:
    """Where an installed wheel put its configs: its RECORD first, then the install schemes' data dirs."""
    found: list[Path] = []
    try:
        files = importlib.metadata.distribution("cl_inversion").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    suffix = (INSTALLED_CONFIG_DIR / "config.yaml").as_posix()
    for file in files:
        if file.as_posix().endswith(suffix):
            found.append(Path(file.locate()).resolve().parent)
    for scheme in dict.fromkeys((sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user"))):
        found.append(Path(sysconfig.get_path("data", scheme)) / INSTALLED_CONFIG_DIR)
    return found


def config_dir() -> Path | None:
    """The config tree the CLI composes from (absolute), or None when neither copy exists."""
    if (PACKAGE_DIR.parent / "pyproject.toml").is_file() and _is_config_dir(REPO_CONFIG_DIR):
        return REPO_CONFIG_DIR  # a checkout: its conf/ is the one being edited
    return next((path for path in _installed_config_dirs() if _is_config_dir(path)), None)


def config_dir_missing_message() -> str:
    return (f"cl-inversion: error: no config tree found (looked for {REPO_CONFIG_DIR}/config.yaml and the "
            f"installed copy under <prefix>/{INSTALLED_CONFIG_DIR.as_posix()}); reinstall cl_inversion "
            "(pip install -e <checkout> or a built wheel)")


_MULTIRUN_FLAGS = ("-m", "--multirun")
_LAUNCHER = re.compile(r"^[+~]*hydra/launcher=(?P<name>.*)$")


def _is_multirun(argv: Sequence[str]) -> bool:
    return any(arg in _MULTIRUN_FLAGS or arg.replace(" ", "") in ("hydra.mode=MULTIRUN", "+hydra.mode=MULTIRUN")
               for arg in argv)


def launcher_override(argv: Sequence[str]) -> str | None:
    """The `hydra/launcher=<name>` chosen on the command line (the last one wins), if any."""
    names = [m.group("name").strip().strip("'\"") for m in map(_LAUNCHER.match, argv) if m]
    return names[-1] if names else None


def slurm_missing_message(argv: Sequence[str]) -> str | None:
    """One error line when a `-m` sweep asks for the SLURM launcher and this machine has no SLURM client."""
    launcher = launcher_override(argv)
    if launcher is None or "slurm" not in launcher or not _is_multirun(argv):
        return None  # without -m Hydra runs the job here and never starts the launcher
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
    if not missing:
        return None
    return (f"cl-inversion: error: hydra/launcher={launcher}: SLURM was not found on this machine "
            f"(no {' or '.join(repr(cmd) for cmd in missing)} on PATH); run the sweep here with "
            "hydra/launcher=local, or submit it from a SLURM login node")


ENGINE_ALIAS = re.compile(r"^\+{0,2}method\.inversion=")


def engine_alias(overrides: Sequence[str]) -> list[str]:
    """`method.inversion=<engine>` (the older spelling) is `inversion/engine=<engine>`: the engine is a config group."""
    return [ENGINE_ALIAS.sub("inversion/engine=", arg) for arg in overrides]
