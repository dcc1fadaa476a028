"""config/topics.yaml: one definition of topics, types, cameras and joint names in explicit arm order."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qvla_ros.episodes.topics import TopicConfigError, load_topic_config, parse_topic_config
from qvla_ros.paths import config_path

REPO = Path(__file__).resolve().parents[2]


def test_shared_config_is_found_in_the_source_tree():
    assert config_path("topics.yaml") == REPO / "config" / "topics.yaml"
    assert config_path("y1_arms.yaml") == REPO / "config" / "y1_arms.yaml"


def test_override_directory(tmp_path, monkeypatch):
    (tmp_path / "topics.yaml").write_text((REPO / "config" / "topics.yaml").read_text())
    monkeypatch.setenv("QVLA_CONFIG_DIR", str(tmp_path))
    assert load_topic_config().source == str(tmp_path / "topics.yaml")


def test_names_and_order():
    cfg = load_topic_config()
    assert cfg.arm_order == ("left", "right")
    assert cfg.joint_names == (
        *(f"left_joint{i}" for i in range(1, 7)),
        "left_gripper",
        *(f"right_joint{i}" for i in range(1, 7)),
        "right_gripper",
    )
    assert cfg.camera_names == ("top", "left_wrist", "right_wrist")
    assert cfg.arm_slice("right") == slice(7, 14)
    assert cfg.camera("top").type == "sensor_msgs/msg/Image"
    assert cfg.arm("left").state.type == cfg.arm("left").command.type == "sensor_msgs/msg/JointState"
    assert cfg.success.type == "std_msgs/msg/Bool" and cfg.metadata.type == "std_msgs/msg/String"
    assert len(cfg.all_topics()) == 10


def test_the_rig_uses_the_same_joint_names():
    from qvla_ros.sim.rig import JOINT_NAMES

    assert JOINT_NAMES == load_topic_config().joint_names


def test_arm_description_is_plain_data():
    arms = yaml.safe_load((REPO / "config" / "y1_arms.yaml").read_text())
    y1 = arms["profiles"]["y1"]
    assert [j["lower"] for j in y1["joints"]] == [-2.8, -3.23, 0.0, -2.1, -1.4, -2.5]
    assert [j["upper"] for j in y1["joints"]] == [2.8, 0.0, 3.05, 1.4, 1.4, 2.5]
    assert y1["gripper"]["stroke_max_m"] == 0.04
    assert len(arms["profiles"]["sim_vx300s"]["joints"]) == 6


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["arms"][0]["joints"].pop(), "expected 7"),
        (lambda d: d["arms"].reverse(), "left then right"),
        (lambda d: d["cameras"][0].update(topic="camera/no_slash"), "absolute"),
        (lambda d: d["cameras"][0].update(qos="fast"), "qos"),
        (lambda d: d["cameras"][1].update(topic="/camera_high/color/image_raw"), "share a topic"),
        (lambda d: d.pop("instruction"), "instruction"),
    ],
)
def test_malformed_config_errors_name_the_entry(edit, message):
    data = yaml.safe_load((REPO / "config" / "topics.yaml").read_text())
    bad = copy.deepcopy(data)
    edit(bad)
    with pytest.raises(TopicConfigError, match=message) as e:
        parse_topic_config(bad, "bad.yaml")
    assert "bad.yaml" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(TopicConfigError, match="does not exist"):
        load_topic_config(tmp_path / "none.yaml")
