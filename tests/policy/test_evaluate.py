"""Closed-loop evaluation in the MuJoCo rig: episodes run, deviation from a reference is Eq. 5."""

from __future__ import annotations

import numpy as np
import pytest

from qvla_ros.policy.evaluate import evaluate, parse_seeds
from qvla_ros.policy.runtime import PolicyRuntime
from qvla_ros.policy.tiny import make_tiny_policy

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    a = PolicyRuntime.load(make_tiny_policy(root / "a", seed=0), warmup=False)
    b = PolicyRuntime.load(make_tiny_policy(root / "b", seed=1), warmup=False)
    return a, b


@pytest.mark.parametrize("blending", ["latest", "temporal_ensemble"])
def test_evaluation_runs_and_measures_deviation(policies, blending):
    a, b = policies
    same = evaluate(
        a, [1000], reference=a, steps=30, replan_every=10, image_size=(48, 64), progress=False, blending=blending
    )
    ep = same.episodes[0]
    assert ep.steps == 30 and ep.predictions == 3 and ep.max_reward >= 0 and not ep.success  # random weights
    assert ep.cumulative_deviation == 0.0 and ep.deviation_curve == [0.0, 0.0, 0.0]
    other = evaluate(
        a, [1000], reference=b, steps=30, replan_every=10, image_size=(48, 64), progress=False, blending=blending
    ).episodes[0]
    # Eq. 5: the curve accumulates ||A - A*|| at each prediction and ends at the episode's total
    assert other.cumulative_deviation > 0
    assert np.all(np.diff(other.deviation_curve) > 0) and other.deviation_curve[-1] == other.cumulative_deviation
    s = same.summary()
    assert s["episodes"] == 1 and s["success_rate"] == 0.0 and s["mean_cumulative_deviation"] == 0.0


def test_seed_ranges():
    assert parse_seeds("1000-1003,7") == [1000, 1001, 1002, 1003, 7]
    with pytest.raises(ValueError):
        parse_seeds(" , ")
