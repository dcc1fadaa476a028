"""The simulated rig and the episode modules are plain Python: they import where no ROS package can be found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CODE = """
import importlib, importlib.abc, pkgutil, sys
ROS = ("rclpy", "rosidl_runtime_py", "rosidl_parser", "qvla_msgs", "std_msgs", "sensor_msgs", "ament_index_python")
class NoRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ROS:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None
sys.meta_path.insert(0, NoRos())
import qvla_ros.sim, qvla_ros.episodes, qvla_ros.paths
names = ["qvla_ros.paths"]
for pkg in (qvla_ros.sim, qvla_ros.episodes):
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
from qvla_ros.paths import config_path
config_path("topics.yaml")
assert not any(m.split(".")[0] in ROS for m in sys.modules)
print(len(names))
"""


def test_sim_and_episodes_import_without_ros():
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MUJOCO_GL": "egl"}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= 10
