"""Episodes round-trip: written, then read back as identical aligned samples, also by an independent reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from episode_fixtures import expected_sample, write_synthetic
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory

from qvla_ros.episodes import load_topic_config, read_episode
from qvla_ros.episodes.reader import Stream, Streams, build_samples, decode_image, decode_joint_state
from qvla_ros.episodes.writer import SIM_EPOCH_NS


def test_written_episode_reads_back_as_identical_samples(synthetic):
    horizon = 8
    ep = read_episode(synthetic.path, horizon=horizon)
    assert len(ep) == len(synthetic.cmd_t) and ep.dropped == {}
    assert ep.success is True and ep.instruction == synthetic.instruction
    assert ep.metadata["seed"] == 0 and ep.metadata["complete"] is True
    assert ep.camera_names == ("top", "left_wrist", "right_wrist") and len(ep.joint_names) == 14
    for k, s in enumerate(ep.samples):
        images, state, actions = expected_sample(synthetic, k, horizon)
        for cam, img in images.items():
            np.testing.assert_array_equal(s.images[cam], img)
        np.testing.assert_array_equal(s.state, state)
        np.testing.assert_array_equal(s.actions, actions)
        assert s.instruction == synthetic.instruction
        assert s.timestamp == pytest.approx(synthetic.cmd_t[k], abs=1e-9)
        assert s.stamp_ns == SIM_EPOCH_NS + round(synthetic.cmd_t[k] * 1e9)
    # the chunk's tail repeats the last command
    np.testing.assert_array_equal(ep.samples[-1].actions, np.repeat(synthetic.commands[-1:], horizon, axis=0))


def _independent_streams(path, cfg) -> Streams:
    """Decode the episode with `mcap` + `mcap-ros2-support` only (no rosbags), into the reader's Streams."""
    mcap_file = next(path.glob("*.mcap"))
    by_topic: dict[str, list] = {}
    with open(mcap_file, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for _schema, channel, message, msg in reader.iter_decoded_messages():
            by_topic.setdefault(channel.topic, []).append((message.log_time, msg))

    def stream(topic, fn):
        items = sorted(by_topic.get(topic, []), key=lambda x: x[0])
        return Stream(np.array([t for t, _ in items], dtype=np.int64), [fn(m) for _, m in items])

    def image(m):
        assert m.encoding == "rgb8" and m.step == 3 * m.width
        return np.frombuffer(bytes(m.data), dtype=np.uint8).reshape(m.height, m.width, 3)

    def joints(arm):
        names = cfg.arm(arm).joints

        def fn(m):
            assert tuple(m.name) == names
            return np.asarray(m.position, dtype=np.float64)

        return fn

    images = {c.name: stream(c.topic, image) for c in cfg.cameras}
    state = {a.name: stream(a.state.topic, joints(a.name)) for a in cfg.arms}
    commands = {a.name: stream(a.command.topic, joints(a.name)) for a in cfg.arms}
    instruction = stream(cfg.instruction.topic, lambda m: m.data)
    success = stream(cfg.success.topic, lambda m: m.data)
    metadata = stream(cfg.metadata.topic, lambda m: json.loads(m.data))
    start = min(int(s.stamps[0]) for s in (*images.values(), *state.values(), *commands.values()))
    return Streams(images, state, commands, instruction, success, metadata, start)


def test_independent_mcap_reader_gives_the_same_samples(synthetic):
    cfg = load_topic_config()
    ours = read_episode(synthetic.path, horizon=5)
    streams = _independent_streams(synthetic.path, cfg)
    assert streams.success.values == [True]
    assert streams.metadata.values[-1]["complete"] is True
    theirs, dropped = build_samples(streams, horizon=5, instruction=streams.instruction.values[0])
    assert dropped == {} and len(theirs) == len(ours)
    for a, b in zip(ours.samples, theirs):
        assert a.stamp_ns == b.stamp_ns and a.instruction == b.instruction
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.actions, b.actions)
        for cam in a.images:
            np.testing.assert_array_equal(a.images[cam], b.images[cam])


def test_bag_metadata_is_standard_rosbag2(synthetic):
    info = yaml.safe_load((synthetic.path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["version"] == 9 and info["storage_identifier"] == "mcap"
    types = {t["topic_metadata"]["name"]: t["topic_metadata"]["type"] for t in info["topics_with_message_count"]}
    assert types == load_topic_config().all_topics()
    assert all(
        t["topic_metadata"]["type_description_hash"].startswith("RIHS01_") for t in info["topics_with_message_count"]
    )
    meta = json.loads(info["custom_data"]["qvla.metadata"])
    assert meta["format"] == "qvla-episode" and meta["success"] is True
    assert meta["joint_names"][0] == "left_joint1" and meta["joint_names"][7] == "right_joint1"


def test_resampling_to_a_lower_rate(synthetic):
    ep = read_episode(synthetic.path, horizon=3, rate_hz=15)
    assert len(ep) == 15
    for i, s in enumerate(ep.samples):
        # every other 30 Hz command; the chunk steps at 15 Hz and repeats the last grid command (28)
        np.testing.assert_array_equal(s.actions[0], synthetic.commands[2 * i])
        np.testing.assert_array_equal(s.actions[1], synthetic.commands[min(2 * i + 2, 28)])


def test_frozen_camera_samples_are_dropped(tmp_path):
    truth = write_synthetic(tmp_path / "frozen", ticks=30, freeze_camera_after={"left_wrist": 0.5})
    ep = read_episode(truth.path, horizon=2, max_staleness_s=0.1)
    assert ep.dropped.get("stale left_wrist image", 0) > 0
    assert all(s.timestamp <= 0.5 + 0.1 + 1e-6 for s in ep.samples)


class _Img:
    def __init__(self, data, h, w, enc, step):
        self.data, self.height, self.width, self.encoding, self.step = data, h, w, enc, step


def test_image_encodings_are_converted_to_rgb():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(decode_image(_Img(rgb.reshape(-1), 2, 3, "rgb8", 9), "x"), rgb)
    np.testing.assert_array_equal(decode_image(_Img(rgb[:, :, ::-1].reshape(-1), 2, 3, "bgr8", 9), "x"), rgb)
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(_Img(rgba.reshape(-1), 2, 3, "rgba8", 12), "x"), rgb)
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((2, 3, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(_Img(bgra.reshape(-1), 2, 3, "bgra8", 12), "x"), rgb)
    mono = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_Img(mono.reshape(-1), 2, 3, "mono8", 3), "x")[:, :, 1], mono)
    # rows padded to a 12-byte step
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    np.testing.assert_array_equal(decode_image(_Img(padded.reshape(-1), 2, 3, "rgb8", 12), "x"), rgb)


def test_joint_states_are_reordered_by_name():
    class JS:
        name = [
            "left_gripper",
            "left_joint6",
            "left_joint5",
            "left_joint4",
            "left_joint3",
            "left_joint2",
            "left_joint1",
        ]
        position = np.arange(7.0)

    joints = load_topic_config().arm("left").joints
    np.testing.assert_array_equal(decode_joint_state(JS, joints, "x"), np.arange(7.0)[::-1])
