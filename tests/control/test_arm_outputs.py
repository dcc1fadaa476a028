"""Arm outputs: field values per arm for each command interface, parsing back, the refused vendor output; the
measured-state parser; message fields."""

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from qvla_ros.control.arm_outputs import ARM_OUTPUTS, ArmOutputError, JointStateParser, make_arm_output
from qvla_ros.control.messages import MessageError, fill, stamp_fields

ARMS = ("left", "right")
NAMES = [f"{a}_{j}" for a in ARMS for j in (*[f"joint{i}" for i in range(1, 7)], "gripper")]
Q = np.arange(14, dtype=float) / 10


def ns(fields):
    """Field dict -> nested SimpleNamespace, i.e. what a subscriber would receive."""
    if isinstance(fields, dict):
        return SimpleNamespace(**{k: ns(v) for k, v in fields.items()})
    if isinstance(fields, list):
        return [ns(v) for v in fields]
    return fields


def test_joint_state_per_arm_and_back():
    a = make_arm_output("joint_state", ARMS, NAMES)
    out = a.build(Q, 12.25)
    assert [t for t, _ in out] == ["/qvla/master_arm_left/joint_states", "/qvla/master_arm_right/joint_states"]
    left = out[0][1]
    assert left["name"] == NAMES[:7] and left["position"] == pytest.approx(Q[:7].tolist())
    assert left["header"]["stamp"] == {"sec": 12, "nanosec": 250_000_000}
    right_msg = ns(out[1][1])
    right_msg.name, right_msg.position = right_msg.name[::-1], right_msg.position[::-1]  # any order, by name
    assert a.parse(right_msg, "right") == pytest.approx(Q[7:])
    with pytest.raises(MessageError, match="lacks"):
        a.parse(SimpleNamespace(name=["x"] * 7, position=[0.0] * 7), "left")


def test_joint_state_parser_reads_measured_states_by_name():
    p = JointStateParser(ARMS, NAMES)
    msg = SimpleNamespace(name=["extra", *NAMES[7:][::-1]], position=[9.0, *Q[7:][::-1]])  # any order, extras
    assert p.parse(msg, "right") == pytest.approx(Q[7:])
    assert p.parse(SimpleNamespace(name=[], position=Q[:7].tolist()), "left") == pytest.approx(Q[:7])  # unnamed
    with pytest.raises(MessageError, match="JointState for left lacks left_gripper"):
        p.parse(SimpleNamespace(name=NAMES[:6], position=[0.0] * 6), "left")
    with pytest.raises(MessageError, match="2 joint names but 3 positions"):
        p.parse(SimpleNamespace(name=NAMES[:2], position=[0.0] * 3), "left")
    with pytest.raises(ArmOutputError, match="13 joint names for 2 arms"):
        JointStateParser(ARMS, NAMES[:13])


def test_forward_command_layout():
    a = make_arm_output("forward_command", ARMS, NAMES, topics=["/l/commands", ""])
    (t0, f0), (t1, f1) = a.build(Q, 0.0)
    assert t0 == "/l/commands" and t1 == "/right_forward_position_controller/commands"
    assert f1["data"] == pytest.approx(Q[7:].tolist())
    assert f1["layout"]["dim"] == [{"label": "joints", "size": 7, "stride": 7}]
    assert a.parse(ns(f1), "right") == pytest.approx(Q[7:])
    with pytest.raises(MessageError, match="expected 7"):
        a.parse(SimpleNamespace(data=[1.0] * 6), "left")


def test_joint_trajectory_single_point():
    a = make_arm_output("joint_trajectory", ARMS, NAMES, time_from_start=0.05)
    (_, f), _ = a.build(Q, 3.0)
    assert f["header"]["stamp"] == {"sec": 0, "nanosec": 0} and f["joint_names"] == NAMES[:7]
    assert len(f["points"]) == 1 and f["points"][0]["time_from_start"] == {"sec": 0, "nanosec": 50_000_000}
    assert a.parse(ns(f), "left") == pytest.approx(Q[:7])


def test_y1_refused_clearly_without_the_vendor_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "y1_msg", None)  # import fails even if a vendor build is on the path
    with pytest.raises(ArmOutputError, match="y1_msg, which is not importable") as e:
        make_arm_output("y1", ARMS, NAMES)
    assert "joint_state, forward_command or joint_trajectory" in str(e.value)


def test_y1_fields_with_a_vendor_package(monkeypatch):
    fake = types.ModuleType("y1_msg")
    fake.__spec__ = types.SimpleNamespace(name="y1_msg")  # find_spec accepts a module with a spec
    monkeypatch.setitem(sys.modules, "y1_msg", fake)
    a = make_arm_output("y1", ARMS, NAMES, joint_velocity=3, gripper_velocity=7, gripper_sdk_max=100.0)
    (t0, f0), (t1, _) = a.build(Q, 1.0)
    assert (t0, t1) == ("/master_arm_left/joint_states", "/master_arm_right/joint_states")
    assert f0["joint_position"] == pytest.approx(Q[:6].tolist()) and f0["gripper_stroke"] == pytest.approx(60.0)
    assert f0["joint_velocity"] == 3 and f0["gripper_velocity"] == 7
    assert a.parse(ns(f0), "left") == pytest.approx(Q[:7])
    with pytest.raises(ArmOutputError, match="1..10"):
        make_arm_output("y1", ARMS, NAMES, joint_velocity=11)


def test_unknown_output_and_bad_topic_list():
    with pytest.raises(ArmOutputError, match="not one of"):
        make_arm_output("can_bus", ARMS, NAMES)
    with pytest.raises(ArmOutputError, match="one per arm"):
        make_arm_output("joint_state", ARMS, NAMES, topics=["/a"])
    assert set(ARM_OUTPUTS) == {"joint_state", "forward_command", "joint_trajectory", "y1"}


def test_stamp_fields_round():
    assert stamp_fields(1.9999999999) == {"sec": 1, "nanosec": 0} or stamp_fields(1.9999999999)["sec"] == 2


def test_fill_nested_plain_objects():
    class Header:
        def __init__(self):
            self.stamp = SimpleNamespace(sec=0, nanosec=0)
            self.frame_id = ""

    class Msg:
        def __init__(self):
            self.header = Header()
            self.position = []

    m = fill(Msg(), {"header": {"stamp": {"sec": 3, "nanosec": 4}}, "position": [1.0]})
    assert (m.header.stamp.sec, m.header.stamp.nanosec, m.position) == (3, 4, [1.0])
