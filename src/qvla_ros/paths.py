"""Where the package's `config/` files are found at run time (plain Python, no ROS needed).

Order: the source tree (a checkout, or `pip install -e .`), then the installed share directory: through
`ament_index_python` when it is importable (a colcon build or the ROS wheels), else `sys.prefix/share/qvla_ros`
(a `pip install .` into a virtual environment, which also installs share/ there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "qvla_ros"
ENV_CONFIG_DIR = "QVLA_CONFIG_DIR"


class ConfigNotFoundError(FileNotFoundError):
    """A configuration file is in none of the places qvla looks; the message lists them."""


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    # An explicit override first: a user who keeps a site-specific copy of config/ points here.
    if os.environ.get(ENV_CONFIG_DIR):
        dirs.append(Path(os.environ[ENV_CONFIG_DIR]))
    # src/qvla_ros/paths.py -> parents[2] is the repository root in a checkout.
    dirs.append(Path(__file__).resolve().parents[2] / "config")
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            dirs.append(Path(get_package_share_directory(PACKAGE)) / "config")
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    dirs.append(Path(sys.prefix) / "share" / PACKAGE / "config")
    return dirs


def config_dir() -> Path:
    """The first existing config directory (see the module docstring for the order)."""
    for d in _candidate_dirs():
        if d.is_dir():
            return d
    looked = ", ".join(str(d) for d in _candidate_dirs())
    raise ConfigNotFoundError(
        f"no qvla config directory found (looked in: {looked}); run from a checkout, install the package "
        f"(`pip install .` or `colcon build`), or set {ENV_CONFIG_DIR}"
    )


def config_path(name: str) -> Path:
    """Path of `config/<name>`, searched in every candidate directory in order."""
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    looked = ", ".join(str(d) for d in _candidate_dirs())
    raise ConfigNotFoundError(
        f"config file {name!r} not found (looked in: {looked}); run from a checkout, install the package "
        f"(`pip install .` or `colcon build`), or set {ENV_CONFIG_DIR}"
    )
