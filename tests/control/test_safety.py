"""Safety filter: limits from the arm description, step limit, non-finite targets, hold-last-safe with reasons."""

from pathlib import Path

import numpy as np
import pytest

from qvla_ros.control.safety import ArmDescriptionError, SafetyFilter, load_arm_description

REPO = Path(__file__).resolve().parents[2]
ARMS = REPO / "config" / "y1_arms.yaml"
NAMES = [f"{a}_{j}" for a in ("left", "right") for j in (*[f"joint{i}" for i in range(1, 7)], "gripper")]
HOME = np.array([0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.5] * 2)


def y1():
    return load_arm_description(ARMS, "y1", NAMES)


def test_y1_limits_in_vector_order():
    d = y1()
    assert d.profile == "y1"
    assert d.lower[:7].tolist() == [-2.8, -3.23, 0.0, -2.1, -1.4, -2.5, 0.0]
    assert d.upper[7:].tolist() == [2.8, 0.0, 3.05, 1.4, 1.4, 2.5, 1.0]
    assert d.gripper_index == (6, 13) and d.gripper["sdk_max"] == 100.0
    assert load_arm_description(ARMS, "real", NAMES).profile == "y1"
    assert load_arm_description(ARMS, "sim", NAMES).profile == "sim_vx300s"


def test_bad_descriptions():
    with pytest.raises(ArmDescriptionError, match="no arm profile 'ur5'"):
        load_arm_description(ARMS, "ur5", NAMES)
    with pytest.raises(ArmDescriptionError, match="does not exist"):
        load_arm_description("/nonexistent.yaml", "y1", NAMES)
    with pytest.raises(ArmDescriptionError, match="entries per arm"):
        load_arm_description(ARMS, "y1", NAMES[:12])


def test_clips_to_limits_and_limits_the_step():
    f = SafetyFilter(y1(), rate_hz=30.0)
    first = f.step(HOME, {}, fallback=HOME)  # the step limit starts from the measured state
    assert not first.held and first.command == pytest.approx(HOME) and first.changed
    far = HOME.copy()
    far[1] = 5.0  # beyond j2's upper limit 0: clipped to 0, then at most 2 rad/s / 30 Hz per tick
    d = f.step(far, {})
    assert "left_joint2" in d.clipped and d.rate_limited
    assert d.command[1] == pytest.approx(-1.0 + 2.0 / 30)
    for _ in range(100):
        d = f.step(far, {})
    assert d.command[1] == pytest.approx(0.0) and np.all(d.command <= f.desc.upper)


def test_clips_to_the_lower_limit_too():
    f = SafetyFilter(y1(), rate_hz=30.0)
    lo, hi = f.desc.lower, f.desc.upper
    below, above = lo - 1.0, hi + 1.0
    assert np.array_equal(f.clip(below)[0], lo) and f.clip(below)[1] == list(f.desc.joint_names)
    assert np.array_equal(f.clip(above)[0], hi) and f.clip(above)[1] == list(f.desc.joint_names)
    inside = (lo + hi) / 2
    assert np.array_equal(f.clip(inside)[0], inside) and f.clip(inside)[1] == []
    # through `step`: j3's lower limit is 0 (HOME has it at 1.0); a target at -5 ends at exactly 0, never below
    f.step(HOME, {}, fallback=HOME)
    low = HOME.copy()
    low[9] = -5.0  # right_joint3
    d = f.step(low, {})
    assert d.clipped == ["right_joint3"] and d.rate_limited
    for _ in range(100):
        d = f.step(low, {})
        assert np.all(d.command >= f.desc.lower)
    assert d.command[9] == pytest.approx(0.0) and d.command == pytest.approx(np.where(np.arange(14) == 9, 0.0, HOME))
    # a measured state below the limits is clipped up when it becomes the hold command
    g = SafetyFilter(y1(), rate_hz=30.0)
    state = HOME.copy()
    state[2] = -0.7  # left_joint3 below 0
    d = g.step(None, {"loading": "policy loading"}, fallback=state)
    assert d.held and d.command[2] == pytest.approx(0.0)


def test_the_step_limit_applies_in_both_directions():
    f = SafetyFilter(y1(), rate_hz=30.0)
    f.step(HOME, {}, fallback=HOME)
    target = HOME.copy()
    target[0] -= 2.0  # left_joint1 down (limit -2.8)
    target[7] += 2.0  # right_joint1 up
    target[6] = 0.0  # left gripper closes: 0.5 down, limited by the gripper's own velocity
    target[13] = 1.0  # right gripper opens: 0.5 up
    step = f.max_step
    d = f.step(target, {})
    assert d.rate_limited and not d.clipped
    assert d.command[0] == pytest.approx(HOME[0] - step[0]) and d.command[7] == pytest.approx(HOME[7] + step[7])
    assert d.command[6] == pytest.approx(HOME[6] - step[6]) and d.command[13] == pytest.approx(HOME[13] + step[13])
    prev = d.command
    for _ in range(200):
        d = f.step(target, {})
        assert np.all(np.abs(d.command - prev) <= step + 1e-12)
        prev = d.command
    assert d.command == pytest.approx(target) and not d.rate_limited
    # and back up from below: a small downward step is not limited, a large one is
    d = f.step(target - np.where(np.arange(14) == 3, 0.5 * step[3], 0.0), {})
    assert not d.rate_limited
    d = f.step(target - np.where(np.arange(14) == 3, 0.5, 0.0), {})
    assert d.rate_limited and d.command[3] == pytest.approx(target[3] - 0.5 * step[3] - step[3])


def test_non_finite_target_holds_last_safe_and_recovers():
    f = SafetyFilter(y1(), rate_hz=30.0)
    f.step(HOME, {}, fallback=HOME)
    bad = HOME.copy()
    bad[[3, 10]] = [np.nan, np.inf]
    d = f.step(bad, {})
    assert d.held and d.command == pytest.approx(HOME) and "left_joint4, right_joint4" in d.reasons["non_finite"]
    assert d.changed
    d = f.step(HOME + 0.01, {})
    assert not d.held and d.changed and d.command == pytest.approx(HOME + 0.01)


def test_a_target_without_any_arm_state_is_not_sent():
    # the step limit needs a starting point: never jump to the first target blind
    d = SafetyFilter(y1(), rate_hz=30.0).step(HOME, {})
    assert d.command is None and "no_state" in d.reasons


def test_hold_reasons_and_transitions():
    f = SafetyFilter(y1(), rate_hz=30.0)
    f.step(HOME, {}, fallback=HOME)
    reasons = {"camera:left_wrist": "camera 'left_wrist' stale"}
    d1 = f.step(HOME + 0.05, reasons)
    d2 = f.step(HOME + 0.05, reasons)
    assert d1.held and d1.changed and not d2.changed and d2.command == pytest.approx(HOME)
    assert d1.why == "camera 'left_wrist' stale"
    d3 = f.step(None, {})
    assert d3.held and "no_action" in d3.reasons and d3.changed
    assert f.held_ticks == 3


def test_first_command_holds_the_measured_state_and_nothing_without_it():
    f = SafetyFilter(y1(), rate_hz=30.0)
    d = f.step(None, {"loading": "policy loading"})
    assert d.command is None and "no_state" in d.reasons
    state = HOME.copy()
    state[0] = 9.0  # outside the limits: the hold command is clipped
    d = f.step(None, {"loading": "policy loading"}, fallback=state)
    assert d.held and d.command[0] == pytest.approx(2.8)
    f.reset()
    assert f.last is None


def test_step_scale():
    f = SafetyFilter(y1(), rate_hz=30.0, step_scale=0.5)
    assert f.max_step[0] == pytest.approx(1.0 / 30)
    with pytest.raises(ValueError):
        SafetyFilter(y1(), rate_hz=0)
