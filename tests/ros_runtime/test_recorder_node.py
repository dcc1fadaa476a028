"""The recorder node over real DDS, in separate processes: the simulated rig (kinematic backend, its scripted
teleoperator publishing the leader-arm commands) and the recorder started as `qvla-bringup --launch record` starts them,
driven and watched by tests/ros_runtime/recorder_probe.py.

Recordings read back completely, in our reader and in an independent one (`mcap` + `mcap-ros2-support`); a recorder
killed with SIGKILL in the middle of an episode leaves a file holding every message it had flushed, and the next start
repairs it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from runtime_helpers import report

pytestmark = pytest.mark.ros
PROBE = Path(__file__).resolve().with_name("recorder_probe.py")


def record_rig(rig, dataset: Path, **overrides):
    return rig(
        launch="record",
        sim="true",
        sim_backend="kinematic",
        dataset=str(dataset),
        overrides={"recorder": {"recorder.min_free_gb": 0.05, "recorder.status_period": 0.5, **overrides}},
    )


def probe(spawn, ros_env, r, *args, timeout=120):
    p = spawn([PROBE, *args], ros_env)
    try:
        return p.finish(timeout=timeout)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"probe failed: {e}\n--- node output ---\n{r.log()}") from None


def mcap_counts(path: Path) -> tuple[Counter, dict]:
    """Messages per topic, decoded by the `mcap` library's own ROS 2 decoder (no rosbags, no qvla code)."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    counts, first = Counter(), {}
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for _schema, channel, _message, msg in reader.iter_decoded_messages():
            counts[channel.topic] += 1
            first.setdefault(channel.topic, msg)
    return counts, first


def test_a_recorded_sim_run_reads_back_completely(rig, ros_env, spawn, tmp_path, request):
    from qvla_ros.episodes import check_integrity, load_topic_config, read_episode

    r = record_rig(rig, tmp_path / "ds")
    out = probe(spawn, ros_env, r, "episode", "--seconds", "3")
    assert out["start"][0] and out["stop_ok"], (out, r.log())
    stop = out["stop"]
    path = Path(stop["path"])
    assert path == tmp_path / "ds" / "episode_000000" and stop["success"] is True, stop
    assert stop["dropped"] == 0 and all(v == 0 for v in stop["dropped_by_topic"].values()), stop
    assert not out["second_stop"][0] and "no episode is recording" in out["second_stop"][1], out

    topics = load_topic_config()
    meta = read_episode(path).metadata
    recorded = {t: v["messages"] for t, v in meta["topics"].items()}
    # 1. our reader: every topic, the counts the recorder reported, aligned 30 Hz samples over the whole episode
    ep = read_episode(path, horizon=10)
    assert check_integrity(path) == "ok"
    assert ep.success is True and ep.instruction and meta["dropped"] == 0
    assert set(ep.camera_names) == set(topics.camera_names)
    assert len(ep) >= 0.8 * 30 * stop["duration_s"], (len(ep), stop["duration_s"], ep.dropped)
    # 2. an independent reader decodes every message, and finds exactly what the recorder counted
    counts, first = mcap_counts(next(path.glob("*.mcap")))
    for topic, n in recorded.items():
        assert counts[topic] == n, (topic, counts[topic], n)
    cam = topics.cameras[0]
    img = first[cam.topic]
    assert (img.height, img.width, img.encoding) == (240, 320, "rgb8") and len(img.data) == 240 * 320 * 3
    assert list(first[topics.arms[0].state.topic].name) == list(topics.arms[0].joints)
    # 3. what an independent subscriber saw in the same window: the recorder kept every message (edges aside)
    rates = {}
    for topic, seen in out["seen"].items():
        n = recorded.get(topic, 0)
        assert n >= seen - 3, (topic, n, seen)  # the recording window encloses the probe's
        rates[topic.split("/")[1] + "/" + topic.split("/")[2]] = n / stop["duration_s"]
    assert 25 <= recorded[cam.topic] / stop["duration_s"] <= 35, (recorded, stop)
    # the teleoperator's leader-arm commands (published by the sim rig's scripted expert) are in the episode
    q = np.array([s.actions[0] for s in ep.samples])
    assert np.ptp(q, axis=0).max() > 0.05, "the recorded commands never moved"
    report(
        request,
        "recording",
        {"duration_s": stop["duration_s"], "messages": stop["messages"], "file_mb": stop["file_bytes"] / 1e6, **rates},
    )


def test_sigkill_mid_episode_keeps_every_flushed_message_and_the_next_start_repairs_it(rig, ros_env, spawn, tmp_path):
    from qvla_ros.episodes import read_episode
    from qvla_ros.episodes.repair import scan_mcap

    ds = tmp_path / "ds"
    r = record_rig(rig, ds, **{"recorder.flush_period": 0.5, "recorder.fsync": False})
    out = probe(spawn, ros_env, r, "flushed", "--min-frames", "20")
    assert out["ok"], (out, r.log())
    flushed = out["flushed"]
    proc = r.runner.procs["recorder"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    partial = ds / ".partial" / "episode_000000"
    files = list(partial.glob("*.mcap"))
    assert len(files) == 1 and not (partial / "metadata.yaml").exists(), list(partial.iterdir())
    scan = scan_mcap(files[0])
    assert not scan.damaged and not scan.problems, scan.describe_damage()
    names = {cid: ch.topic for cid, ch in scan.channels.items()}
    on_disk = Counter(names[m.channel_id] for m in scan.messages)
    for topic, n in flushed.items():
        assert on_disk[topic] >= n, (topic, on_disk[topic], n)  # nothing flushed before the kill is missing
    assert sum(flushed.values()) > 60, flushed

    # the next start finds the interrupted episode and repairs it (aside: outside the dataset until a person keeps
    # it), and numbering continues after it
    cmd = [
        "-m",
        "qvla_ros.nodes.recorder_node",
        "--ros-args",
        "-r",
        "__ns:=/qvla",
        "-p",
        f"recorder.dataset:={ds}",
        "-p",
        "recorder.min_free_gb:=0.05",
        "-p",
        "recorder.keyboard:=false",
    ]
    again = spawn(cmd, ros_env)
    deadline = time.monotonic() + 60
    log = ds / "episodes.jsonl"
    while time.monotonic() < deadline and not (log.exists() and "recovered" in log.read_text()):
        time.sleep(0.2)
    again.kill()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    rec = [e for e in entries if e["event"] == "recovered"]
    assert rec and rec[0]["messages"] >= sum(flushed.values()), entries
    repaired = ds / ".recovered" / "episode_000000"
    assert Path(rec[0]["path"]) == repaired and not partial.exists()
    ep = read_episode(repaired)
    assert ep.instruction == "pick up the probe's cube" and ep.success is None and len(ep) > 10
    info = yaml.safe_load((repaired / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert json.loads(info["custom_data"]["qvla.metadata"])["repair"]["messages_recovered"] == rec[0]["messages"]


def test_bad_parameters_and_a_full_disk_are_refused_in_one_line(ros_env, tmp_path):
    base = [sys.executable, "-m", "qvla_ros.nodes.recorder_node", "--ros-args"]
    out = subprocess.run(base, env=ros_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "recorder.dataset is empty" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        base + ["-p", f"recorder.dataset:={tmp_path / 'ds'}", "-p", "recorder.min_free_gb:=1e5"],
        env=ros_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "less than the margin" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_keys_in_the_terminal_keep_redo_and_stop(rig, ros_env, tmp_path):
    """A person at the robot: the recorder in a terminal (a pseudo-terminal here), lerobot-record's keys."""
    import os
    import pty
    import termios
    import threading

    rig(launch="sim", sim_backend="kinematic", teleop="true")
    ds = tmp_path / "ds"
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    cmd = [
        sys.executable,
        "-m",
        "qvla_ros.nodes.recorder_node",
        "--ros-args",
        "-r",
        "__ns:=/qvla",
        "-p",
        f"recorder.dataset:={ds}",
        "-p",
        "recorder.min_free_gb:=0.05",
        "-p",
        "recorder.auto_start:=true",
        "-p",
        "recorder.reset_time:=0.5",
        "-p",
        "recorder.exit_when_done:=true",
        "-p",
        "recorder.rig_service:=/qvla/sim/episode",
        "-p",
        "recorder.status_period:=0.0",
    ]
    proc = subprocess.Popen(cmd, env=ros_env, stdin=slave, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()

    def wait_for(text, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in lines):
                return
            time.sleep(0.05)
        proc.kill()
        raise AssertionError(f"{text!r} not in the recorder's output:\n{''.join(lines)[-3000:]}")

    try:
        wait_for("episode 0 recording")
        time.sleep(1.0)
        os.write(master, b"\x1b[C")  # right arrow: keep
        wait_for("episode 0 kept")
        wait_for("episode 1 recording")
        time.sleep(0.5)
        os.write(master, b"\x1b[D")  # left arrow: discard, record again
        wait_for("episode 1 discarded")
        wait_for("episode 2 recording")
        time.sleep(0.5)
        os.write(master, b"\x1b")  # Esc: stop recording (the current episode is kept)
        wait_for("recording stopped (Esc pressed)")
        assert proc.wait(timeout=30) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after == before  # the terminal is as it was
    assert [p.name for p in sorted(ds.glob("episode_*"))] == ["episode_000000", "episode_000002"]
    events = [json.loads(line)["event"] for line in (ds / "episodes.jsonl").read_text().splitlines()]
    assert events == ["kept", "discarded", "kept"], events
