"""Fixtures for the simulated rig's tests: headless rendering, small images, one rig per module."""

from __future__ import annotations

import os

# Before anything imports mujoco (the rig sets the same default, but a test may import mujoco first).
if "MUJOCO_GL" not in os.environ and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ["MUJOCO_GL"] = "egl"

import pytest  # noqa: E402

SMALL = (48, 64)


@pytest.fixture(scope="module")
def small_rig():
    from qvla_ros.sim.rig import SimRig

    rig = SimRig(image_size=SMALL)
    yield rig
    rig.close()
