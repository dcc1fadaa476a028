"""Bad episodes give an EpisodeError that names the file, the problem and what to do; crashes lose little."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from episode_fixtures import write_synthetic

from qvla_ros.episodes import EpisodeError, EpisodeWriter, load_topic_config, read_episode, sim_stamp_ns
from qvla_ros.episodes import cli as episodes_cli
from qvla_ros.episodes.repair import repair_episode
from qvla_ros.episodes.topics import parse_topic_config
from qvla_ros.episodes.writer import typestore

REPO = Path(__file__).resolve().parents[2]


def test_missing_path(tmp_path):
    with pytest.raises(EpisodeError, match="no such episode") as e:
        read_episode(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_truncated_file_gives_a_clear_error_and_can_be_repaired(tmp_path):
    synthetic = write_synthetic(tmp_path / "episode_synthetic", flush_every_s=0.2)  # several MCAP chunks
    mcap = next(synthetic.path.glob("*.mcap"))
    size = mcap.stat().st_size
    with open(mcap, "r+b") as f:
        f.truncate(size * 2 // 3)
    with pytest.raises(EpisodeError) as e:
        read_episode(synthetic.path)
    msg = str(e.value)
    assert str(synthetic.path) in msg and "truncated" in msg and "qvla-episodes repair" in msg
    out, report = repair_episode(synthetic.path)
    assert out == synthetic.path.with_name(synthetic.path.name + "_repaired") and report["messages_recovered"] > 0
    ep = read_episode(out)
    assert len(ep) > 0 and ep.success is None  # the success message was in the lost tail


def test_corrupt_chunk_gives_a_clear_error(tmp_path):
    from mcap.reader import make_reader

    truth = write_synthetic(tmp_path / "corrupt", flush_every_s=0.2)
    mcap = next(truth.path.glob("*.mcap"))
    with open(mcap, "rb") as f:
        chunk = make_reader(f).get_summary().chunk_indexes[1]
    data = bytearray(mcap.read_bytes())
    # garble a chunk's header (times, sizes, CRC, compression): bit rot or a bad copy (a flipped payload byte is
    # caught by the chunk's CRC: test_episode_checksums.py)
    start = chunk.chunk_start_offset + 9
    data[start : start + 48] = b"\xff" * 48
    mcap.write_bytes(bytes(data))
    with pytest.raises(EpisodeError) as e:
        read_episode(truth.path)
    assert str(truth.path) in str(e.value)


CRASHING_RECORDER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from qvla_ros.episodes import EpisodeWriter, sim_stamp_ns
    w = EpisodeWriter(sys.argv[1], flush_every_s=0.5).open()
    w.write_instruction(sim_stamp_ns(0), "crash test")
    img = np.zeros((12, 16, 3), np.uint8)
    for k in range(90):  # 3 s at 30 Hz, then the process dies without closing anything
        t = k / 30
        w.write_state(sim_stamp_ns(t), np.full(14, k, float))
        for cam in ("top", "left_wrist", "right_wrist"):
            w.write_image(cam, sim_stamp_ns(t), img + k % 256)
        w.write_command(sim_stamp_ns(t), np.full(14, k, float))
    os._exit(1)
    """
)


def test_crash_mid_recording_loses_at_most_the_last_messages(tmp_path):
    path = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", CRASHING_RECORDER, str(path)], env=env, capture_output=True)
    assert proc.returncode == 1, proc.stderr.decode()
    with pytest.raises(EpisodeError, match="never closed") as e:
        read_episode(path)
    assert "qvla-episodes repair" in str(e.value)
    out, report = repair_episode(path, tmp_path / "recovered")
    ep = read_episode(out, horizon=2)
    # flushed every 0.5 s of message time: at most that (plus the tick being written) is lost of the 3 s
    assert ep.samples[-1].timestamp >= 3.0 - 0.5 - 1 / 30 - 1e-6
    assert ep.instruction == "crash test" and ep.success is None
    np.testing.assert_array_equal(ep.samples[10].actions[0], np.full(14, 10.0))


def test_crashed_recording_keeps_checksummed_chunks(tmp_path):
    from mcap.exceptions import EndOfFile
    from mcap.records import Chunk
    from mcap.stream_reader import StreamReader

    path = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", CRASHING_RECORDER, str(path)], env=env, capture_output=True)
    assert proc.returncode == 1, proc.stderr.decode()
    chunks = []
    reader = StreamReader(str(next(path.glob("*.mcap"))), emit_chunks=True, validate_crcs=True).records
    with pytest.raises(EndOfFile):  # no footer: the recorder died
        for record in reader:
            if isinstance(record, Chunk):
                chunks.append(record)
    assert len(chunks) >= 5 and all(c.uncompressed_crc for c in chunks)  # flushed, checksummed, validated


@pytest.mark.parametrize("metadata_yaml", [True, False], ids=["closed", "no-metadata.yaml"])
def test_zero_size_file(tmp_path, metadata_yaml):
    truth = write_synthetic(tmp_path / "empty")
    mcap = next(truth.path.glob("*.mcap"))
    mcap.write_bytes(b"")
    if not metadata_yaml:
        (truth.path / "metadata.yaml").unlink()
    for target in (truth.path, mcap):
        with pytest.raises(EpisodeError) as e:
            read_episode(target)
        msg = str(e.value)
        assert msg.startswith(f"{mcap}: the file is empty (0 bytes)") and "cannot recover" in msg
    with pytest.raises(EpisodeError, match="empty") as e:
        repair_episode(truth.path)
    assert str(mcap) in str(e.value)


@pytest.mark.parametrize("metadata_yaml", [True, False], ids=["closed", "no-metadata.yaml"])
def test_garbage_under_an_mcap_name(tmp_path, metadata_yaml):
    truth = write_synthetic(tmp_path / "garbage")
    mcap = next(truth.path.glob("*.mcap"))
    mcap.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 64)  # say, a zip archive renamed
    if not metadata_yaml:
        (truth.path / "metadata.yaml").unlink()
    for target in (truth.path, mcap):
        with pytest.raises(EpisodeError) as e:
            read_episode(target)
        msg = str(e.value)
        assert msg.startswith(f"{mcap}: not an MCAP file (it starts with b'PK\\x03\\x04") and "cannot recover" in msg
    with pytest.raises(EpisodeError, match="not an MCAP file") as e:
        repair_episode(truth.path)
    assert str(mcap) in str(e.value)


def test_missing_topic(tmp_path):
    truth = write_synthetic(tmp_path / "two_cams", cameras=("top", "left_wrist"))
    with pytest.raises(EpisodeError, match="/camera_right/color/image_raw") as e:
        read_episode(truth.path)
    assert "missing or empty" in str(e.value) and str(truth.path) in str(e.value)
    # reading only the cameras that are there works
    assert len(read_episode(truth.path, cameras=("top", "left_wrist"))) == 30


def _episode_with_top_image(path, **fields):
    """An otherwise fine episode whose top camera frame has the given Image fields."""
    truth = write_synthetic(path, cameras=("left_wrist", "right_wrist"), finish=False)
    cfg = load_topic_config()
    ts = typestore()
    Image = ts.types["sensor_msgs/msg/Image"]
    w = EpisodeWriter(path.with_name(path.name + "_bad"), cfg).open()
    header = w._header(sim_stamp_ns(0))
    img = dict(
        header=header, height=12, width=16, encoding="rgb8", is_bigendian=0, step=48, data=np.zeros(12 * 48, np.uint8)
    )
    img.update(fields)
    for k, t in enumerate(truth.cmd_t):
        w.write_raw(cfg.camera("top").topic, sim_stamp_ns(t), ts.serialize_cdr(Image(**img), Image.__msgtype__))
        w.write_state(sim_stamp_ns(t), truth.states[0])
        w.write_command(sim_stamp_ns(t), truth.commands[k])
        for cam in ("left_wrist", "right_wrist"):
            w.write_image(cam, sim_stamp_ns(t), truth.images[cam][k])
    w.write_instruction(sim_stamp_ns(0), "x")
    w.close()
    return w.path


def test_unsupported_encoding(tmp_path):
    path = _episode_with_top_image(tmp_path / "enc", encoding="yuv422", step=32, data=np.zeros(12 * 32, np.uint8))
    with pytest.raises(EpisodeError, match="yuv422") as e:
        read_episode(path)
    assert "rgb8" in str(e.value) and "/camera_high/color/image_raw" in str(e.value)


def test_mismatched_step_and_size(tmp_path):
    path = _episode_with_top_image(tmp_path / "step", step=40)
    with pytest.raises(EpisodeError, match="inconsistent image"):
        read_episode(path)


def test_wrong_message_type_on_a_topic(synthetic):
    import yaml

    data = yaml.safe_load(Path(load_topic_config().source).read_text())
    data["cameras"][0]["type"] = "sensor_msgs/msg/CompressedImage"  # a config that disagrees with the file
    odd = parse_topic_config(data, "odd.yaml")
    with pytest.raises(EpisodeError) as e:
        read_episode(synthetic.path, topics=odd)
    msg = str(e.value)
    assert "/camera_high/color/image_raw has type sensor_msgs/msg/Image" in msg and "CompressedImage" in msg


def test_writer_refuses_to_overwrite(synthetic):
    with pytest.raises(FileExistsError, match="never overwritten"):
        EpisodeWriter(synthetic.path).open()


def test_exception_while_recording_still_closes_the_bag(tmp_path):
    path = tmp_path / "aborted"
    with pytest.raises(RuntimeError), EpisodeWriter(path) as w:
        w.write_instruction(sim_stamp_ns(0), "x")
        raise RuntimeError("camera unplugged")
    assert (path / "metadata.yaml").exists()
    with pytest.raises(EpisodeError, match="missing or empty"):
        read_episode(path)


def test_episodes_cli_info_and_repair(synthetic, tmp_path, capsys):
    assert episodes_cli.main(["info", str(synthetic.path), "--json", "--horizon", "4"]) == 0
    assert '"samples": 30' in capsys.readouterr().out
    (synthetic.path / "metadata.yaml").unlink()
    assert episodes_cli.main(["info", str(synthetic.path)]) == 1
    err = capsys.readouterr().err
    assert "never closed" in err and "Traceback" not in err
    assert episodes_cli.main(["repair", str(synthetic.path), "--out", str(tmp_path / "fixed")]) == 0
    assert episodes_cli.main(["info", str(tmp_path / "fixed")]) == 0
