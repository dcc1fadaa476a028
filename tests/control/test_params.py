"""Parameter schemas: config/bimanual.yaml sets every parameter validly, agrees with config/topics.yaml, and bad
values are refused with the parameter's name."""

from pathlib import Path

import pytest
import yaml

from qvla_ros.control.arm_outputs import make_arm_output
from qvla_ros.control.params import (
    CALIBRATION_NODE,
    MONITOR_NODE,
    POLICY_NODE,
    RECORDER_NODE,
    SIM_RIG_NODE,
    ParameterError,
    read_params_file,
)
from qvla_ros.episodes.topics import load_topic_config

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "config" / "bimanual.yaml"


@pytest.mark.parametrize(
    "schema", [POLICY_NODE, SIM_RIG_NODE, MONITOR_NODE, RECORDER_NODE, CALIBRATION_NODE], ids=lambda s: s.node
)
def test_every_parameter_has_a_valid_default_and_a_description(schema):
    values = schema.defaults(PARAMS)
    assert set(values) == set(schema.names)
    assert all(len(s.description) > 20 for s in schema.specs)


def test_the_parameter_file_holds_nothing_unknown():
    blocks = read_params_file(PARAMS)
    # one shared block: a node-specific block would outrank `-p` overrides on the command line
    assert set(blocks) == {"/**"}
    known = set(POLICY_NODE.names) | set(SIM_RIG_NODE.names) | set(MONITOR_NODE.names)
    known |= set(RECORDER_NODE.names) | set(CALIBRATION_NODE.names)
    assert set(blocks["/**"]) == known


def test_names_and_topics_agree_with_topics_yaml():
    topics = load_topic_config(REPO / "config" / "topics.yaml")
    v = POLICY_NODE.defaults(PARAMS)
    assert v["cameras.names"] == list(topics.camera_names)
    assert v["cameras.topics"] == [c.topic for c in topics.cameras]
    assert v["arms.names"] == list(topics.arm_order)
    assert v["arms.joint_names"] == list(topics.joint_names)
    assert v["arms.state_topics"] == [a.state.topic for a in topics.arms]
    assert v["instruction.topic"] == topics.instruction.topic
    assert SIM_RIG_NODE.defaults(PARAMS)["episode.success_topic"] == topics.success.topic
    # the default arm output's default topics are the rig's command topics
    output = make_arm_output(v["output.adapter"], v["arms.names"], v["arms.joint_names"], v["output.topics"])
    assert [o.topic for o in output.arm_topics] == [a.command.topic for a in topics.arms]


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("control.rate_hz", 0.0, r"control.rate_hz = 0.0 is outside \[1.0, 1000.0\]"),
        ("control.rate_hz", "30", "control.rate_hz must be of type double"),
        ("control.blending", "mean", "control.blending = 'mean' is not one of latest, temporal_ensemble"),
        ("cameras.topics", ["/a", "/b"], "cameras.topics has 2 entries but cameras.names has 3"),
        ("arms.joint_names", ["a"] * 13, "arms.joint_names needs exactly 14 entries"),
        ("policy.device", "tpu", "policy.device 'tpu' must be cpu, cuda or cuda:N"),
        ("output.adapter", "can", "output.adapter = 'can' is not one of"),
        ("policy.warmup", 1, "policy.warmup must be of type bool"),
        ("estop.topic", "", "estop.topic must not be empty"),
    ],
)
def test_bad_values_name_the_parameter(name, value, match):
    values = POLICY_NODE.defaults(PARAMS)
    with pytest.raises(ParameterError, match=match):
        POLICY_NODE.validate({**values, name: value})


def test_integer_accepted_for_double_and_ranges_on_integers():
    values = POLICY_NODE.defaults(PARAMS)
    assert POLICY_NODE.validate({**values, "control.rate_hz": 50})["control.rate_hz"] == 50.0
    with pytest.raises(ParameterError, match="output.y1_joint_velocity"):
        POLICY_NODE.validate({**values, "output.y1_joint_velocity": 0})


def test_sim_cameras_enabled_length():
    values = SIM_RIG_NODE.defaults(PARAMS)
    with pytest.raises(ParameterError, match="sim.cameras_enabled has 2 entries"):
        SIM_RIG_NODE.validate({**values, "sim.cameras_enabled": [True, False]})


def test_file_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"/**/policy_node": {"ros__parameters": {"control": {"rate": 30}}}}))
    with pytest.raises(ParameterError, match="unknown parameter.*control.rate"):
        POLICY_NODE.defaults(bad)
    bad.write_text(yaml.safe_dump({"policy_node": {"params": {}}}))
    with pytest.raises(ParameterError, match="no ros__parameters"):
        POLICY_NODE.defaults(bad)
    with pytest.raises(ParameterError, match="does not exist"):
        POLICY_NODE.defaults(tmp_path / "missing.yaml")
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"/**/policy_node": {"ros__parameters": {"control": {"rate_hz": 30.0}}}}))
    with pytest.raises(ParameterError, match="no default for policy_node parameter"):
        POLICY_NODE.defaults(partial)
