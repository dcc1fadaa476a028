"""The rig's topics, message types, camera and joint names, loaded from `config/topics.yaml` (no ROS needed).

One file defines them for the simulated rig, the episode writer/reader and the ROS nodes, so that a recording
made on the real rig and one made in simulation have the same topics, and arm order is never implicit:

    cfg = load_topic_config()
    cfg.joint_names            # 14 names: left_joint1..6, left_gripper, right_joint1..6, right_gripper
    cfg.camera_names           # ("top", "left_wrist", "right_wrist")
    cfg.camera("top").topic    # "/camera_high/color/image_raw"
    cfg.arm("left").command.topic
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from qvla_ros.paths import config_path

TOPICS_FILE = "topics.yaml"
SUPPORTED_VERSION = 1
# QoS profile names a topic entry may use; the ROS nodes map them to rclpy profiles:
# sensor_data = best effort, keep last 5 (rclpy's qos_profile_sensor_data); reliable = reliable, keep last 10;
# transient_local = reliable, keep last 1, late joiners get the last message (latched).
QOS_NAMES = ("sensor_data", "reliable", "transient_local")
ARM_JOINTS = 7  # 6 arm joints + gripper


class TopicConfigError(ValueError):
    """config/topics.yaml is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class TopicSpec:
    topic: str
    type: str  # ROS 2 interface name, e.g. "sensor_msgs/msg/JointState"
    qos: str = "reliable"


@dataclass(frozen=True)
class CameraSpec:
    name: str
    topic: str
    type: str
    frame_id: str
    qos: str = "sensor_data"


@dataclass(frozen=True)
class ArmSpec:
    name: str
    joints: tuple[str, ...]  # 6 joints + gripper, in vector order
    state: TopicSpec
    command: TopicSpec


@dataclass(frozen=True)
class TopicConfig:
    version: int
    arms: tuple[ArmSpec, ...]  # in arm order (left, right)
    cameras: tuple[CameraSpec, ...]  # in policy order
    instruction: TopicSpec
    success: TopicSpec
    metadata: TopicSpec
    gripper_units: str = "normalized_opening"
    source: str = ""  # the file it was loaded from

    @property
    def arm_order(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arms)

    @property
    def joint_names(self) -> tuple[str, ...]:
        """All 14 joint names in vector order (left arm 6 + gripper, right arm 6 + gripper)."""
        return tuple(j for a in self.arms for j in a.joints)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm {name!r} in {self.source or TOPICS_FILE} (arms: {', '.join(self.arm_order)})")

    def camera(self, name: str) -> CameraSpec:
        for c in self.cameras:
            if c.name == name:
                return c
        raise KeyError(f"no camera {name!r} in {self.source or TOPICS_FILE} (cameras: {', '.join(self.camera_names)})")

    def arm_slice(self, name: str) -> slice:
        """Where arm `name`'s 7 entries sit in a 14-dim vector."""
        i = self.arm_order.index(name)
        return slice(i * ARM_JOINTS, (i + 1) * ARM_JOINTS)

    def all_topics(self) -> dict[str, str]:
        """topic -> message type, for every topic of an episode."""
        out = {c.topic: c.type for c in self.cameras}
        for a in self.arms:
            out[a.state.topic] = a.state.type
            out[a.command.topic] = a.command.type
        for t in (self.instruction, self.success, self.metadata):
            out[t.topic] = t.type
        return out


def _topic(raw, where: str, src: str) -> TopicSpec:
    if not isinstance(raw, dict) or "topic" not in raw or "type" not in raw:
        raise TopicConfigError(f"{src}: {where} needs a mapping with `topic` and `type`, got {raw!r}")
    spec = TopicSpec(topic=str(raw["topic"]), type=str(raw["type"]), qos=str(raw.get("qos", "reliable")))
    _check_topic(spec.topic, spec.qos, where, src)
    return spec


def _check_topic(topic: str, qos: str, where: str, src: str) -> None:
    if not topic.startswith("/"):
        raise TopicConfigError(f"{src}: {where} topic {topic!r} must be absolute (start with '/')")
    if qos not in QOS_NAMES:
        raise TopicConfigError(f"{src}: {where} qos {qos!r} is not one of {', '.join(QOS_NAMES)}")


def parse_topic_config(data: dict, source: str = TOPICS_FILE) -> TopicConfig:
    """Validate the parsed YAML document and build a TopicConfig (errors name `source` and the entry)."""
    if not isinstance(data, dict):
        raise TopicConfigError(f"{source}: expected a mapping at the top level")
    version = data.get("version")
    if version != SUPPORTED_VERSION:
        raise TopicConfigError(f"{source}: version {version!r} is not supported (expected {SUPPORTED_VERSION})")

    arms = []
    for i, raw in enumerate(data.get("arms") or []):
        where = f"arms[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise TopicConfigError(f"{source}: {where} needs `name`, `joints`, `state`, `command`")
        joints = tuple(str(j) for j in raw.get("joints") or [])
        if len(joints) != ARM_JOINTS:
            raise TopicConfigError(
                f"{source}: {where} ({raw['name']}) lists {len(joints)} joints; expected {ARM_JOINTS} (6 + gripper)"
            )
        arms.append(
            ArmSpec(
                name=str(raw["name"]),
                joints=joints,
                state=_topic(raw.get("state"), f"{where}.state", source),
                command=_topic(raw.get("command"), f"{where}.command", source),
            )
        )
    order = data.get("arm_order")
    if [a.name for a in arms] != ["left", "right"] or (order is not None and list(order) != ["left", "right"]):
        raise TopicConfigError(
            f"{source}: `arms` must list exactly left then right (and arm_order [left, right]); "
            f"got {[a.name for a in arms]}"
        )

    cameras = []
    for i, raw in enumerate(data.get("cameras") or []):
        where = f"cameras[{i}]"
        if not isinstance(raw, dict) or not {"name", "topic", "type"} <= raw.keys():
            raise TopicConfigError(f"{source}: {where} needs `name`, `topic`, `type` (and `frame_id`, `qos`)")
        cam = CameraSpec(
            name=str(raw["name"]),
            topic=str(raw["topic"]),
            type=str(raw["type"]),
            frame_id=str(raw.get("frame_id", raw["name"])),
            qos=str(raw.get("qos", "sensor_data")),
        )
        _check_topic(cam.topic, cam.qos, where, source)
        cameras.append(cam)
    if not cameras:
        raise TopicConfigError(f"{source}: `cameras` is empty")

    episode = data.get("episode") or {}
    cfg = TopicConfig(
        version=int(version),
        arms=tuple(arms),
        cameras=tuple(cameras),
        instruction=_topic(data.get("instruction"), "instruction", source),
        success=_topic(episode.get("success"), "episode.success", source),
        metadata=_topic(episode.get("metadata"), "episode.metadata", source),
        gripper_units=str(data.get("gripper_units", "normalized_opening")),
        source=source,
    )
    names = [t for t in cfg.all_topics()]
    n_entries = len(cfg.cameras) + 2 * len(cfg.arms) + 3
    if len(names) != n_entries:
        raise TopicConfigError(f"{source}: two entries share a topic name")
    if len(set(cfg.joint_names)) != len(cfg.joint_names) or len(set(cfg.camera_names)) != len(cfg.cameras):
        raise TopicConfigError(f"{source}: joint or camera names repeat")
    return cfg


def load_topic_config(path: str | Path | None = None) -> TopicConfig:
    """Load config/topics.yaml (found through qvla_ros.paths), or the file at `path`."""
    p = Path(path) if path is not None else config_path(TOPICS_FILE)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise TopicConfigError(f"topic configuration {p} does not exist") from None
    except yaml.YAMLError as e:
        raise TopicConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_topic_config(data, source=str(p))
