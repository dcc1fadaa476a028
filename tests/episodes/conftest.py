"""Fixtures for the episode tests: headless rendering for the sim round trip, a synthetic episode."""

from __future__ import annotations

import os

# Before anything imports mujoco (qvla_ros.sim sets the same default, but a test may import mujoco first).
if "MUJOCO_GL" not in os.environ and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ["MUJOCO_GL"] = "egl"

import pytest  # noqa: E402
from episode_fixtures import Truth, write_synthetic  # noqa: E402


@pytest.fixture
def synthetic(tmp_path) -> Truth:
    return write_synthetic(tmp_path / "episode_synthetic")
