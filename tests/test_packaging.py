"""Packaging promises: qvla_quant works without ROS; the installed qvla_ros share dir is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A Python in which rclpy (and every ROS Python package) cannot be found, as for a pip user who only wants the
# quantizer: a meta-path finder that refuses them, installed before anything is imported.
NO_ROS_PRELUDE = """
import importlib.abc, sys
ROS = ("rclpy", "rosidl_runtime_py", "rosidl_parser", "qvla_msgs", "std_msgs", "sensor_msgs", "ament_index_python")
class NoRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ROS:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None
sys.meta_path.insert(0, NoRos())
"""


# Packages that promise to work without ROS: the quantizer (pip users), and the plain-Python logic that the nodes
# use (sim rig, episodes, policy runtime, control), which robots without ROS and offline tools import.
ROS_FREE = ("qvla_quant", "qvla_ros.sim", "qvla_ros.episodes", "qvla_ros.policy", "qvla_ros.control")


@pytest.mark.parametrize("package", ROS_FREE)
def test_imports_without_rclpy(package):
    code = (
        NO_ROS_PRELUDE
        + f"""
import importlib, pkgutil
pkg = importlib.import_module({package!r})
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
from qvla_ros.paths import config_path
config_path("topics.yaml")
assert not any(m.split(".")[0] in ROS for m in sys.modules), sorted(m for m in sys.modules if m.startswith("rcl"))
print(len(names))
"""
    )
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "MUJOCO_GL": "egl"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= 2  # the package's modules were really walked


@pytest.mark.ros
def test_installed_share_directory_has_launch_and_config():
    """`make setup` installs qvla_ros (not editable); ament finds its share dir with launch/ and config/."""
    code = """
from ament_index_python.packages import get_package_share_directory, get_resource
from pathlib import Path
share = Path(get_package_share_directory("qvla_ros"))
print(share)
print(get_resource("packages", "qvla_ros")[1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    share = Path(out.stdout.splitlines()[0])
    assert (share / "package.xml").is_file()
    assert (share / "config" / "fastdds_shm.xml").is_file()
    for name in ("bimanual.launch.py", "sim.launch.py"):
        assert (share / "launch" / name).is_file(), f"{name} missing from {share / 'launch'}"
    # the share dir mirrors the source tree's config/ and launch/ (make setup reinstalls when they change)
    for folder in ("config", "launch"):
        src = {p.relative_to(REPO / folder) for p in (REPO / folder).rglob("*") if p.is_file()}
        dst = {p.relative_to(share / folder) for p in (share / folder).rglob("*") if p.is_file()}
        assert src <= dst, f"not installed from {folder}/: {sorted(map(str, src - dst))}"
