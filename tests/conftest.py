"""Shared test fixtures: ROS processes on their own DDS domain, over shared memory, on this machine only."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_domain_counter = itertools.count()

# Headless rendering for every MuJoCo user in the suite (the sim rig, the evaluation, the monitor's forward
# kinematics), set before any test module imports mujoco: whichever subset of the tests runs, and in what order.
if "MUJOCO_GL" not in os.environ and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ["MUJOCO_GL"] = "egl"


# The packed layers' exact fp32 reference path for every test (and every node a test starts), unless a test picks a
# kernel family itself: the packed-format tests hold the reference to 1e-5 of the fake-quant math, while the CPU
# fast path computes with bf16 activations (~3e-3 relative, bounded in qvla_quant.kernels.reference) and has its
# own tests (tests/qvla_quant/test_kernels_*.py, and the committed policy through the default path below).
os.environ.setdefault("QVLA_KERNELS", "reference")


def ros_available() -> bool:
    return importlib.util.find_spec("rclpy") is not None and importlib.util.find_spec("qvla_msgs") is not None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not ros_available():
        skips["ros"] = pytest.mark.skip(
            reason="rclpy or qvla_msgs not importable: run `make setup` (or source your ROS 2 install)"
        )
    if any("gpu" in item.keywords for item in items) and not cuda_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def ros_env() -> dict[str, str]:
    """Environment for ROS child processes: a domain ID of this test alone, SHM transport, sources on the path.

    Parallel test runs (and other users' processes) on this machine must never see each other's topics.
    """
    sys.path.insert(0, str(REPO / "src"))
    from qvla_ros.dds import local_dds_environment

    domain = 20 + (os.getpid() * 7 + next(_domain_counter)) % 200
    env = local_dds_environment(domain_id=domain)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process whose stdout lines are JSON; killed at teardown whatever happens."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def read_json(self) -> dict:
        line = self.popen.stdout.readline()
        if not line:
            raise AssertionError(f"process ended without output; stderr:\n{self.popen.stderr.read()[-3000:]}")
        return json.loads(line)

    def finish(self, timeout: float = 60.0) -> dict:
        out, err = self.popen.communicate(timeout=timeout)
        lines = [x for x in out.splitlines() if x.startswith("{")]
        assert self.popen.returncode == 0 and lines, (
            f"rc={self.popen.returncode}\nstdout:{out[-2000:]}\nstderr:{err[-3000:]}"
        )
        return json.loads(lines[-1])

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()


@pytest.fixture
def spawn():
    """spawn(args, env) -> Proc; every process is killed at the end of the test."""
    procs: list[Proc] = []

    def _spawn(args: list[str], env: dict[str, str]) -> Proc:
        p = Proc([str(a) for a in args], env)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.kill()
