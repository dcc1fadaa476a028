"""Input faults the policy node must name (issue: misleading hold reasons, impossible states): stamps going backwards,
cameras out of sync with a clock mismatch, a stream whose clock restarted, malformed frames, impossible states."""

from types import SimpleNamespace

import numpy as np
import pytest

from qvla_ros.control.images import ImageFormatError, check_compressed, check_image
from qvla_ros.control.safety import load_arm_description, measured_state_problem
from qvla_ros.control.sync import ApproxTimeSync
from qvla_ros.paths import config_path

CAMS = ("top", "left_wrist", "right_wrist")
JOINTS = [f"{a}_{j}" for a in ("left", "right") for j in (*[f"joint{i}" for i in range(1, 7)], "gripper")]


def feed(sync, t, received=None, names=CAMS, offset=0.0):
    for name in names:
        sync.add(name, t + offset, (t if received is None else received) + 0.002, name)


def test_stamps_going_backwards_are_named_not_reported_as_stale():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.12)
    for k in range(5):
        feed(s, k / 30)
    # top's driver now stamps 2 s in the past while its frames keep arriving every 33 ms
    for k in range(5, 15):
        t = k / 30
        feed(s, t, names=("left_wrist", "right_wrist"))
        s.add("top", t - 2.0, t + 0.002, "top")
    reasons = s.stale_by_name(now=14 / 30 + 0.01)
    assert set(reasons) == {"top"}
    assert "went backwards by" in reasons["top"] and "ignored" in reasons["top"] and "stale" not in reasons["top"]


def test_a_stopped_camera_is_still_called_stale():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.12)
    for k in range(5):
        feed(s, k / 30)
    reasons = s.stale_by_name(now=4 / 30 + 0.5)
    assert all("stale: last message" in r for r in reasons.values()) and len(reasons) == 3


def test_a_stream_whose_clock_restarted_recovers_after_max_age():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.12)
    feed(s, 100.0)
    s.add("top", 1000.0, 100.04, "bogus future stamp")  # one frame far in the future ...
    t = 100.0
    for k in range(1, 40):  # ... then normal frames again, behind it: ignored at first, restarted after 1 s
        t = 100.0 + k / 30
        feed(s, t)
        if t < 100.04 + s.restart_after - 0.05:
            assert s.resets == 0 and "went backwards" in s.stale_by_name(t + 0.003).get("top", "went backwards")
    assert s.resets == 1
    r = s.newest(now=t + 0.01)
    assert r.ok and abs(r.stamp - t) < 1e-9


def test_a_single_late_frame_does_not_restart_the_timeline():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.12)
    for k in range(5):
        feed(s, k / 30)
    s.add("top", 2 / 30, 4 / 30 + 0.01, "late duplicate")
    for k in range(5, 12):
        feed(s, k / 30)
    assert s.resets == 0 and s.stats()["top"]["out_of_order"] == 1


def test_out_of_sync_reason_names_the_clock_mismatch():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.5)
    for k in range(5):
        t = 50.0 + k / 30
        feed(s, t, names=("left_wrist", "right_wrist"))
        s.add("top", t - 5.0, t + 0.002, "top")  # top's clock runs 5 s behind the others and the receipt time
    r = s.newest(now=50.0 + 4 / 30 + 0.01)
    assert not r.ok
    assert "out of sync" in r.reason and "top -5000 ms" in r.reason
    assert "clocks disagree" in r.reason and "top -5.00" in r.reason


def test_status_check_leaves_the_unmatched_counter_alone():
    s = ApproxTimeSync(CAMS, slop=0.001, max_age=1.0)
    s.add("top", 0.0, 0.5, "x")
    s.add("left_wrist", 0.1, 0.5, "x")
    s.add("right_wrist", 0.2, 0.5, "x")
    assert not s.newest(0.6, count=False).ok and s.unmatched == 0
    assert not s.newest(0.6).ok and s.unmatched == 1


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(encoding="yuv422", height=4, width=4, step=8, data=bytes(32)), "encoding 'yuv422' is not supported"),
        (dict(encoding="rgb8", height=4, width=4, step=6, data=bytes(48)), "step 6 is shorter"),
        (dict(encoding="rgb8", height=4, width=4, step=12, data=bytes(40)), "truncated"),
        (dict(encoding="rgb8", height=0, width=4, step=12, data=b""), "empty image"),
    ],
)
def test_check_image_names_the_camera_and_the_fault(fields, match):
    with pytest.raises(ImageFormatError, match=match) as e:
        check_image(SimpleNamespace(**fields), "camera 'top'")
    assert "camera 'top'" in str(e.value)


def test_check_image_accepts_padded_rows():
    msg = SimpleNamespace(encoding="bgr8", height=2, width=3, step=12, data=bytes(24))
    assert check_image(msg) == (2, 3, 3, 12)


def test_check_compressed():
    check_compressed(SimpleNamespace(format="jpeg", data=b"\xff\xd8"))
    with pytest.raises(ImageFormatError, match="empty"):
        check_compressed(SimpleNamespace(format="jpeg", data=b""), "camera 'top'")
    with pytest.raises(ImageFormatError, match="not supported"):
        check_compressed(SimpleNamespace(format="tiff", data=b"x"))


@pytest.fixture(scope="module")
def y1():
    return load_arm_description(config_path("y1_arms.yaml"), "y1", JOINTS)


def test_measured_state_within_limits_passes(y1):
    mid = (y1.lower + y1.upper) / 2
    assert measured_state_problem(y1, mid[:7], 0) == ""
    assert measured_state_problem(y1, mid[7:], 7) == ""
    # slightly outside (a sensor that reads past the limit by 5% of the range) is still a real reading
    edge = y1.upper[7:] + 0.05 * (y1.upper[7:] - y1.lower[7:])
    assert measured_state_problem(y1, edge, 7, margin=0.2) == ""


def test_impossible_and_non_finite_states_are_named(y1):
    q = ((y1.lower + y1.upper) / 2)[7:].copy()
    q[2] = 100.0
    why = measured_state_problem(y1, q, 7, margin=0.2)
    assert "right_joint3 = 100" in why and "outside its limits" in why
    q[2] = -np.inf
    assert "non-finite" in measured_state_problem(y1, q, 7) and "right_joint3" in measured_state_problem(y1, q, 7)
    low = ((y1.lower + y1.upper) / 2)[:7].copy()
    low[0] = y1.lower[0] - 0.3 * (y1.upper[0] - y1.lower[0])
    assert "left_joint1" in measured_state_problem(y1, low, 0, margin=0.2)
