"""Fixtures for the simulated rig's tests: small images, one rig per module (headless rendering: tests/conftest.py)."""

from __future__ import annotations

import pytest

SMALL = (48, 64)


@pytest.fixture(scope="module")
def small_rig():
    from qvla_ros.sim.rig import SimRig

    rig = SimRig(image_size=SMALL)
    yield rig
    rig.close()
