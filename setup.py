"""The repository root is the ROS 2 package `qvla_ros` (ament_python).

It installs two Python packages from src/: `qvla_ros` (nodes and the ROS-free control logic they use) and
`qvla_quant` (the quantization library, which never imports ROS). Launch files, configuration and the ament
index marker go to share/ so that `ros2 launch qvla_ros ...` and `get_package_share_directory` find them,
whether built by colcon or installed with `pip install .` into a virtual environment.
"""

from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "qvla_ros"
HERE = Path(__file__).parent


def share_tree(folder: str):
    """data_files entries that mirror `folder` (recursively) under share/qvla_ros/."""
    entries = {}
    for path in sorted(glob(f"{folder}/**/*", recursive=True)):
        if Path(path).is_file():
            target = f"share/{PACKAGE}/{Path(path).parent.as_posix()}"
            entries.setdefault(target, []).append(path)
    return list(entries.items())


CONSOLE_SCRIPTS = [
    # qvla_quant CLIs (no ROS needed)
    "qvla-quant = qvla_quant.cli:main",
    # ROS 2 runtime: nodes, the launch-free bring-up runner, the demo
    "qvla-policy-node = qvla_ros.nodes.policy_node:main",
    "qvla-monitor-node = qvla_ros.nodes.monitor_node:main",
    "qvla-sim-rig-node = qvla_ros.nodes.sim_rig_node:main",
    "qvla-recorder-node = qvla_ros.nodes.recorder_node:main",
    "qvla-calibration-node = qvla_ros.nodes.calibration_node:main",
    "qvla-bringup = qvla_ros.bringup:main",
    "qvla-demo = qvla_ros.demo:main",
    # simulated rig and episodes (no ROS needed)
    "qvla-sim = qvla_ros.sim.cli:main",
    "qvla-episodes = qvla_ros.episodes.cli:main",
    # policies: training and closed-loop evaluation in the simulated rig
    "qvla-train = qvla_ros.policy.train:main",
    "qvla-eval = qvla_ros.policy.evaluate:main",
    "qvla-policy-quantize = qvla_ros.policy.quantize:main",
    "qvla-calibrate = qvla_ros.policy.calibration_job:main",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    package_dir={"": "src"},
    packages=find_packages("src", include=["qvla_ros", "qvla_ros.*", "qvla_quant", "qvla_quant.*"]),
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        *share_tree("launch"),
        *share_tree("config"),
    ],
    python_requires=">=3.10",
    install_requires=[],  # pinned in requirements/; ROS packages come from the ROS install or the wheels
    zip_safe=False,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
