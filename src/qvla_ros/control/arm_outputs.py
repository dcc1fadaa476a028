"""Arm outputs: one 14-dim command (left arm 6 joints + gripper, then right) -> per-arm messages of the arm
interface the robot speaks, and back (the simulated rig applies commands through the same outputs).

    joint_state       sensor_msgs/JointState per arm (names, positions) — qvla's own topics (config/topics.yaml)
    forward_command   std_msgs/Float64MultiArray per arm, for a ros2_control forward_command_controller
                      (position interface, joints in the arm's order: 6 joints then the gripper)
    joint_trajectory  trajectory_msgs/JointTrajectory per arm, one point `time_from_start` ahead, for a
                      joint_trajectory_controller (header stamp 0 = start now)
    y1                y1_msg/ArmJointPositionControl per arm on /master_arm_{left,right}/joint_states, the IMETA
                      vendor driver's command (6 joints in rad, speed 1-10, gripper stroke in SDK units 0-100);
                      refused with a clear message when y1_msg is not importable

The parameter `output.adapter` names the output; `make_arm_output` builds it. An output builds plain field
dictionaries (qvla_ros.control.messages.fill copies them into a message object) and parses a received command back
into the arm's 7 values. `JointStateParser` reads the measured arm states (sensor_msgs/JointState) into the same
vector order. Nothing here imports rclpy.

Errors: ArmOutputError when an output cannot be set up (unknown name, missing vendor package, topic or joint
lists that do not fit the arms); MessageError (qvla_ros.control.messages) when a received message is malformed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from qvla_ros.control.messages import MessageError, duration_fields, stamp_fields

ARM_OUTPUTS = ("joint_state", "forward_command", "joint_trajectory", "y1")
PER_ARM = 7  # 6 joints + gripper


class ArmOutputError(ValueError):
    """An arm output cannot be set up (unknown name, missing vendor package, bad topic or joint list)."""


@dataclass(frozen=True)
class ArmTopic:
    """Where one arm's commands go and which part of the command vector they carry."""

    arm: str  # "left" / "right"
    topic: str
    joints: tuple[str, ...]  # the arm's 7 names in vector order
    index: slice  # where they sit in the 14-dim vector


def _arm_joints(arms, joint_names, what: str) -> list[tuple[str, ...]]:
    """Each arm's 7 joint names, in vector order."""
    if len(joint_names) != PER_ARM * len(arms):
        raise ArmOutputError(
            f"{what}: {len(joint_names)} joint names for {len(arms)} arms; "
            f"expected {PER_ARM} per arm (6 joints + gripper)"
        )
    return [tuple(joint_names[i * PER_ARM : (i + 1) * PER_ARM]) for i in range(len(arms))]


def _check7(values, what: str) -> np.ndarray:
    v = np.asarray(list(values), dtype=np.float64)
    if v.shape != (PER_ARM,):
        raise MessageError(f"{what}: expected {PER_ARM} values (6 joints + gripper), got {v.size}")
    return v


def _named_positions(names, positions, joints: tuple[str, ...], arm: str, what: str) -> np.ndarray:
    """The arm's 7 values in `joints` order, from a message that names its joints (any order, extra joints
    allowed); a message without names must already be in our order."""
    names, pos = list(names), list(positions)
    if names:
        if len(names) != len(pos):
            raise MessageError(f"{what} for {arm}: {len(names)} joint names but {len(pos)} positions")
        by_name = dict(zip(names, pos))
        missing = [j for j in joints if j not in by_name]
        if missing:
            raise MessageError(f"{what} for {arm} lacks {', '.join(missing)} (has {', '.join(names)})")
        pos = [by_name[j] for j in joints]
    return _check7(pos, f"{what} for {arm}")


class JointStateParser:
    """Measured arm states, one sensor_msgs/JointState per arm -> the arm's 7 values in vector order (joints found
    by name; MessageError when the message is malformed)."""

    def __init__(self, arms: list[str] | tuple[str, ...], joint_names: list[str] | tuple[str, ...]):
        self.joints = dict(zip(arms, _arm_joints(arms, joint_names, "arm states")))

    def parse(self, msg, arm: str) -> np.ndarray:
        return _named_positions(msg.name, msg.position, self.joints[arm], arm, "JointState")


class ArmOutput:
    """Base: per-arm topics and the 14-dim vector split. Subclasses define msg_type, the default topic, build, parse."""

    name = ""
    msg_type = ""

    def __init__(
        self,
        arms: list[str] | tuple[str, ...],
        joint_names: list[str] | tuple[str, ...],
        topics: list[str] | tuple[str, ...] = (),
        **options,
    ):
        joints = _arm_joints(arms, joint_names, self.name)
        topics = list(topics) or [""] * len(arms)
        if len(topics) != len(arms):
            raise ArmOutputError(
                f"output.topics has {len(topics)} entries for {len(arms)} arms "
                f"({', '.join(arms)}); give one per arm, or '' for the adapter's default"
            )
        self.arm_topics = tuple(
            ArmTopic(arm, topic or self.default_topic(arm), joints[i], slice(i * PER_ARM, (i + 1) * PER_ARM))
            for i, (arm, topic) in enumerate(zip(arms, topics))
        )
        self.options = options

    def default_topic(self, arm: str) -> str:
        raise NotImplementedError

    def build(self, q: np.ndarray, t: float) -> list[tuple[str, dict]]:
        """(topic, fields) per arm for the command q at time t (s)."""
        q = np.asarray(q, dtype=np.float64)
        return [(o.topic, self.arm_fields(o, q[o.index], t)) for o in self.arm_topics]

    def arm_fields(self, out: ArmTopic, q7: np.ndarray, t: float) -> dict:
        raise NotImplementedError

    def parse(self, msg, arm: str) -> np.ndarray:
        """A received command for `arm` -> its 7 targets in vector order (MessageError when malformed)."""
        raise NotImplementedError

    def arm_topic(self, arm: str) -> ArmTopic:
        for o in self.arm_topics:
            if o.arm == arm:
                return o
        raise KeyError(arm)


class JointStateOutput(ArmOutput):
    name = "joint_state"
    msg_type = "sensor_msgs/msg/JointState"

    def default_topic(self, arm):
        return f"/qvla/master_arm_{arm}/joint_states"

    def arm_fields(self, out, q7, t):
        return {"header": {"stamp": stamp_fields(t)}, "name": list(out.joints), "position": q7.tolist()}

    def parse(self, msg, arm):
        return _named_positions(msg.name, msg.position, self.arm_topic(arm).joints, arm, "JointState")


class ForwardCommandOutput(ArmOutput):
    name = "forward_command"
    msg_type = "std_msgs/msg/Float64MultiArray"

    def default_topic(self, arm):
        return f"/{arm}_forward_position_controller/commands"

    def arm_fields(self, out, q7, t):
        return {
            "layout": {"dim": [{"label": "joints", "size": PER_ARM, "stride": PER_ARM}], "data_offset": 0},
            "data": q7.tolist(),
        }

    def parse(self, msg, arm):
        return _check7(msg.data, f"Float64MultiArray for {arm}")


class JointTrajectoryOutput(ArmOutput):
    name = "joint_trajectory"
    msg_type = "trajectory_msgs/msg/JointTrajectory"

    def default_topic(self, arm):
        return f"/{arm}_joint_trajectory_controller/joint_trajectory"

    def arm_fields(self, out, q7, t):
        lead = float(self.options.get("time_from_start", 1.0 / 30.0))
        # header stamp 0: the controller starts the trajectory on receipt (a streamed command, not a plan)
        return {
            "header": {"stamp": {"sec": 0, "nanosec": 0}},
            "joint_names": list(out.joints),
            "points": [{"positions": q7.tolist(), "time_from_start": duration_fields(lead)}],
        }

    def parse(self, msg, arm):
        if not msg.points:
            raise MessageError(f"JointTrajectory for {arm} has no points")
        return _named_positions(
            msg.joint_names, msg.points[-1].positions, self.arm_topic(arm).joints, arm, "JointTrajectory"
        )


class Y1Output(ArmOutput):
    name = "y1"
    msg_type = "y1_msg/msg/ArmJointPositionControl"

    def __init__(self, *args, **options):
        if importlib.util.find_spec("y1_msg") is None:
            raise ArmOutputError(
                "output.adapter 'y1' needs the IMETA vendor message package y1_msg, which is not importable here. "
                "Build and source the vendor's ROS 2 workspace (y1_controller / y1_msg) before starting the node, "
                "or choose another output.adapter: joint_state, forward_command or joint_trajectory"
            )
        super().__init__(*args, **options)
        for key in ("joint_velocity", "gripper_velocity"):
            v = int(options.get(key, 5))
            if not 1 <= v <= 10:
                raise ArmOutputError(f"output.y1_{key} must be in 1..10 (vendor speed scale), got {v}")

    def default_topic(self, arm):
        return f"/master_arm_{arm}/joint_states"

    def arm_fields(self, out, q7, t):
        sdk_max = float(self.options.get("gripper_sdk_max", 100.0))
        return {
            "header": {"stamp": stamp_fields(t)},
            "joint_position": q7[:6].tolist(),
            "joint_velocity": int(self.options.get("joint_velocity", 5)),
            "gripper_stroke": float(q7[6] * sdk_max),
            "gripper_velocity": int(self.options.get("gripper_velocity", 5)),
        }

    def parse(self, msg, arm):
        sdk_max = float(self.options.get("gripper_sdk_max", 100.0))
        joints = list(msg.joint_position)
        return _check7([*joints, float(msg.gripper_stroke) / sdk_max], f"ArmJointPositionControl for {arm}")


_CLASSES = {c.name: c for c in (JointStateOutput, ForwardCommandOutput, JointTrajectoryOutput, Y1Output)}


def make_arm_output(name: str, arms, joint_names, topics=(), **options) -> ArmOutput:
    """The arm output called `name` (one of ARM_OUTPUTS); ArmOutputError with what to do when it cannot be used."""
    if name not in _CLASSES:
        raise ArmOutputError(f"output.adapter {name!r} is not one of {', '.join(ARM_OUTPUTS)}")
    return _CLASSES[name](arms, joint_names, topics, **options)
