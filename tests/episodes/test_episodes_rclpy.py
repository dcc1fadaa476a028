"""Episodes are real ROS 2 data: rclpy deserializes every message, and the bag's type hashes are ROS 2's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qvla_ros.episodes import load_topic_config

serialization = pytest.importorskip("rclpy.serialization", reason="rclpy not importable (run `make setup`)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:lark.*")  # ROS's parser, not our code


def _ros_class(msgtype: str):
    pkg, _, name = msgtype.split("/")
    module = pytest.importorskip(f"{pkg}.msg", reason=f"{pkg} Python messages not installed")
    return getattr(module, name)


def _installed_hash(msgtype: str) -> str | None:
    pkg, kind, name = msgtype.split("/")
    path = Path(sys.prefix) / "share" / pkg / kind / f"{name}.json"
    if not path.exists():
        return None
    for entry in json.loads(path.read_text())["type_hashes"]:
        if entry["type_name"] == msgtype:
            return entry["hash_string"]
    return None


def test_rclpy_reads_every_topic(synthetic):
    from rosbags.rosbag2 import Reader

    first = {}
    with Reader(synthetic.path) as reader:
        for conn, _stamp, raw in reader.messages():
            first.setdefault(conn.topic, (conn, raw))
    assert len(first) == 10
    for topic, (conn, raw) in first.items():
        msg = serialization.deserialize_message(bytes(raw), _ros_class(conn.msgtype))
        expected = _installed_hash(conn.msgtype)
        if expected is not None:
            assert conn.digest == expected, f"{topic}: {conn.digest} != ROS 2's {expected}"
        if conn.msgtype == "sensor_msgs/msg/Image":
            assert msg.encoding == "rgb8" and msg.step == 3 * msg.width
            img = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
            camera = {c.topic: c.name for c in load_topic_config().cameras}[topic]
            np.testing.assert_array_equal(img, synthetic.images[camera][0])
        if topic == "/qvla/puppet_arm_left/joint_states":
            assert list(msg.name)[0] == "left_joint1"
            np.testing.assert_array_equal(np.array(msg.position), synthetic.states[0][:7])
    info = yaml.safe_load((synthetic.path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["storage_identifier"] == "mcap"
