"""Output adapters: one 14-dim command (left arm 6 joints + gripper, then right) -> per-arm messages of the arm
interface the robot speaks, and back (the simulated rig applies commands through the same adapters).

    joint_state       sensor_msgs/JointState per arm (names, positions) — qvla's own topics (config/topics.yaml)
    forward_command   std_msgs/Float64MultiArray per arm, for a ros2_control forward_command_controller
                      (position interface, joints in the arm's order: 6 joints then the gripper)
    joint_trajectory  trajectory_msgs/JointTrajectory per arm, one point `time_from_start` ahead, for a
                      joint_trajectory_controller (header stamp 0 = start now)
    y1                y1_msg/ArmJointPositionControl per arm on /master_arm_{left,right}/joint_states, the IMETA
                      vendor driver's command (6 joints in rad, speed 1-10, gripper stroke in SDK units 0-100);
                      refused with a clear message when y1_msg is not importable

An adapter builds plain field dictionaries; `fill` copies them into a message object. Nothing here imports rclpy:
message classes are imported by name only when a node asks for them.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass

import numpy as np

ADAPTERS = ("joint_state", "forward_command", "joint_trajectory", "y1")
PER_ARM = 7  # 6 joints + gripper


class AdapterError(ValueError):
    """An adapter cannot be used (unknown name, missing vendor package, bad topic list, malformed message)."""


def import_message_type(name: str):
    """'sensor_msgs/msg/JointState' (or 'sensor_msgs/JointState') -> the message class."""
    parts = name.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        raise AdapterError(f"not a ROS interface name: {name!r}")
    pkg, kind, typ = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), typ)
    except (ImportError, AttributeError) as e:
        raise AdapterError(f"message type {name} is not importable ({e}); install or source the package {pkg}") from e


def stamp_fields(t: float) -> dict:
    sec = int(np.floor(t))
    return {"sec": sec, "nanosec": int(round((t - sec) * 1e9)) % 1_000_000_000}


def duration_fields(seconds: float) -> dict:
    return stamp_fields(seconds)


_SEQ = re.compile(r"sequence<([\w]+)/([\w]+)(?:,\s*\d+)?>")


def fill(msg, fields: dict):
    """Copy a nested field dictionary into a ROS message object (what rosidl_runtime_py.set_message_fields does;
    that package has no wheel). Lists of dicts become lists of the field's element message type."""
    types = msg.get_fields_and_field_types() if hasattr(msg, "get_fields_and_field_types") else {}
    for key, value in fields.items():
        if isinstance(value, dict):
            fill(getattr(msg, key), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            m = _SEQ.fullmatch(types.get(key, ""))
            if not m:
                raise AdapterError(f"{type(msg).__name__}.{key} is not a sequence of messages")
            cls = import_message_type(f"{m.group(1)}/msg/{m.group(2)}")
            items = []
            for v in value:
                item = cls()
                fill(item, v)
                items.append(item)
            setattr(msg, key, items)
        else:
            setattr(msg, key, value)
    return msg


@dataclass(frozen=True)
class ArmOutput:
    arm: str  # "left" / "right"
    topic: str
    joints: tuple[str, ...]  # the arm's 7 names in vector order
    index: slice  # where they sit in the 14-dim vector


class OutputAdapter:
    """Base: per-arm topics and the 14-dim vector split. Subclasses define msg_type, the default topic, build, parse."""

    name = ""
    msg_type = ""

    def __init__(self, arms: list[str] | tuple[str, ...], joint_names: list[str] | tuple[str, ...],
                 topics: list[str] | tuple[str, ...] = (), **options):
        if len(joint_names) != PER_ARM * len(arms):
            raise AdapterError(f"{self.name}: {len(joint_names)} joint names for {len(arms)} arms; "
                               f"expected {PER_ARM} per arm (6 joints + gripper)")
        topics = list(topics) or [""] * len(arms)
        if len(topics) != len(arms):
            raise AdapterError(f"output.topics has {len(topics)} entries for {len(arms)} arms ({', '.join(arms)}); "
                               "give one per arm, or '' for the adapter's default")
        self.outputs = tuple(
            ArmOutput(arm, topic or self.default_topic(arm), tuple(joint_names[i * PER_ARM:(i + 1) * PER_ARM]),
                      slice(i * PER_ARM, (i + 1) * PER_ARM))
            for i, (arm, topic) in enumerate(zip(arms, topics))
        )
        self.options = options

    def default_topic(self, arm: str) -> str:
        raise NotImplementedError

    def build(self, q: np.ndarray, t: float) -> list[tuple[str, dict]]:
        """(topic, fields) per arm for the command q at time t (s)."""
        q = np.asarray(q, dtype=np.float64)
        return [(o.topic, self.arm_fields(o, q[o.index], t)) for o in self.outputs]

    def arm_fields(self, out: ArmOutput, q7: np.ndarray, t: float) -> dict:
        raise NotImplementedError

    def parse(self, msg, arm: str) -> np.ndarray:
        """A received message for `arm` -> its 7 targets in vector order (AdapterError when malformed)."""
        raise NotImplementedError

    def output(self, arm: str) -> ArmOutput:
        for o in self.outputs:
            if o.arm == arm:
                return o
        raise KeyError(arm)

    @staticmethod
    def _check7(values, what: str) -> np.ndarray:
        v = np.asarray(list(values), dtype=np.float64)
        if v.shape != (PER_ARM,):
            raise AdapterError(f"{what}: expected {PER_ARM} values (6 joints + gripper), got {v.size}")
        return v

    def _named_positions(self, names, positions, arm: str, what: str) -> np.ndarray:
        """The arm's 7 values in our joint order, from a message that names its joints (any order, extra joints
        allowed); a message without names must already be in our order."""
        names, pos = list(names), list(positions)
        if names:
            if len(names) != len(pos):
                raise AdapterError(f"{what} for {arm}: {len(names)} joint names but {len(pos)} positions")
            by_name = dict(zip(names, pos))
            joints = self.output(arm).joints
            missing = [j for j in joints if j not in by_name]
            if missing:
                raise AdapterError(f"{what} for {arm} lacks {', '.join(missing)} (has {', '.join(names)})")
            pos = [by_name[j] for j in joints]
        return self._check7(pos, f"{what} for {arm}")


class JointStateAdapter(OutputAdapter):
    name = "joint_state"
    msg_type = "sensor_msgs/msg/JointState"

    def default_topic(self, arm):
        return f"/qvla/master_arm_{arm}/joint_states"

    def arm_fields(self, out, q7, t):
        return {"header": {"stamp": stamp_fields(t)}, "name": list(out.joints), "position": q7.tolist()}

    def parse(self, msg, arm):
        return self._named_positions(msg.name, msg.position, arm, "JointState")


class ForwardCommandAdapter(OutputAdapter):
    name = "forward_command"
    msg_type = "std_msgs/msg/Float64MultiArray"

    def default_topic(self, arm):
        return f"/{arm}_forward_position_controller/commands"

    def arm_fields(self, out, q7, t):
        return {"layout": {"dim": [{"label": "joints", "size": PER_ARM, "stride": PER_ARM}], "data_offset": 0},
                "data": q7.tolist()}

    def parse(self, msg, arm):
        return self._check7(msg.data, f"Float64MultiArray for {arm}")


class JointTrajectoryAdapter(OutputAdapter):
    name = "joint_trajectory"
    msg_type = "trajectory_msgs/msg/JointTrajectory"

    def default_topic(self, arm):
        return f"/{arm}_joint_trajectory_controller/joint_trajectory"

    def arm_fields(self, out, q7, t):
        lead = float(self.options.get("time_from_start", 1.0 / 30.0))
        # header stamp 0: the controller starts the trajectory on receipt (a streamed command, not a plan)
        return {"header": {"stamp": {"sec": 0, "nanosec": 0}}, "joint_names": list(out.joints),
                "points": [{"positions": q7.tolist(), "time_from_start": duration_fields(lead)}]}

    def parse(self, msg, arm):
        if not msg.points:
            raise AdapterError(f"JointTrajectory for {arm} has no points")
        return self._named_positions(msg.joint_names, msg.points[-1].positions, arm, "JointTrajectory")


class Y1Adapter(OutputAdapter):
    name = "y1"
    msg_type = "y1_msg/msg/ArmJointPositionControl"

    def __init__(self, *args, **options):
        if importlib.util.find_spec("y1_msg") is None:
            raise AdapterError(
                "output.adapter 'y1' needs the IMETA vendor message package y1_msg, which is not importable here. "
                "Build and source the vendor's ROS 2 workspace (y1_controller / y1_msg) before starting the node, "
                "or choose another output.adapter: joint_state, forward_command or joint_trajectory"
            )
        super().__init__(*args, **options)
        for key in ("joint_velocity", "gripper_velocity"):
            v = int(options.get(key, 5))
            if not 1 <= v <= 10:
                raise AdapterError(f"output.y1_{key} must be in 1..10 (vendor speed scale), got {v}")

    def default_topic(self, arm):
        return f"/master_arm_{arm}/joint_states"

    def arm_fields(self, out, q7, t):
        sdk_max = float(self.options.get("gripper_sdk_max", 100.0))
        return {"header": {"stamp": stamp_fields(t)}, "joint_position": q7[:6].tolist(),
                "joint_velocity": int(self.options.get("joint_velocity", 5)),
                "gripper_stroke": float(q7[6] * sdk_max),
                "gripper_velocity": int(self.options.get("gripper_velocity", 5))}

    def parse(self, msg, arm):
        sdk_max = float(self.options.get("gripper_sdk_max", 100.0))
        joints = list(msg.joint_position)
        return self._check7([*joints, float(msg.gripper_stroke) / sdk_max], f"ArmJointPositionControl for {arm}")


_CLASSES = {c.name: c for c in (JointStateAdapter, ForwardCommandAdapter, JointTrajectoryAdapter, Y1Adapter)}


def make_adapter(name: str, arms, joint_names, topics=(), **options) -> OutputAdapter:
    """The adapter called `name` (one of ADAPTERS); AdapterError with what to do when it cannot be used."""
    if name not in _CLASSES:
        raise AdapterError(f"output.adapter {name!r} is not one of {', '.join(ADAPTERS)}")
    return _CLASSES[name](arms, joint_names, topics, **options)
