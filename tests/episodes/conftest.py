"""Fixtures for the episode tests: a synthetic episode (headless rendering: tests/conftest.py)."""

from __future__ import annotations

import pytest
from episode_fixtures import Truth, write_synthetic


@pytest.fixture
def synthetic(tmp_path) -> Truth:
    return write_synthetic(tmp_path / "episode_synthetic")
