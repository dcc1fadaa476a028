"""The recorder's ROS-free core (qvla_ros.episodes.recorder), the terminal keys (qvla_ros.episodes.keys) and the
sim rig's scripted teleoperators: episodes from raw CDR bytes that our reader reads, numbering that resumes, the disk
margin, drops counted per topic, crashed episodes recovered on the next start, keys on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qvla_ros.episodes import EpisodeWriter, load_topic_config, read_episode, sim_stamp_ns
from qvla_ros.episodes.keys import ESC_TIMEOUT_S, KeyParser, TerminalKeys
from qvla_ros.episodes.recorder import DatasetRecorder, RecorderError, SequenceTracker, list_episodes
from qvla_ros.episodes.repair import scan_mcap
from qvla_ros.episodes.writer import typestore

REPO = Path(__file__).resolve().parents[2]
CFG = load_topic_config()


class Source:
    """CDR bytes of a tiny rig: what a recorder's raw subscriptions would receive, stamped on a 30 Hz clock."""

    def __init__(self, size=(8, 12)):
        self.ts = typestore()
        self.size = size
        self.rng = np.random.default_rng(0)

    def header(self, t_ns):
        T = self.ts.types
        return T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id=""
        )

    def tick(self, k: int):
        """(topic, stamp, bytes) of tick k: three images, both states, both commands."""
        T = self.ts.types
        t = sim_stamp_ns(k / 30)
        h, w = self.size
        out = []
        for cam in CFG.cameras:
            img = T["sensor_msgs/msg/Image"](
                header=self.header(t),
                height=h,
                width=w,
                encoding="rgb8",
                is_bigendian=0,
                step=3 * w,
                data=self.rng.integers(0, 255, h * w * 3, dtype=np.uint8),
            )
            out.append((cam.topic, t, self.ts.serialize_cdr(img, cam.type)))
        for arm in CFG.arms:
            for spec in (arm.state, arm.command):
                js = T["sensor_msgs/msg/JointState"](
                    header=self.header(t),
                    name=list(arm.joints),
                    position=np.full(7, 0.01 * k),
                    velocity=np.zeros(0),
                    effort=np.zeros(0),
                )
                out.append((spec.topic, t + 1, self.ts.serialize_cdr(js, spec.type)))
        return out

    def instruction(self, text: str) -> bytes:
        return self.ts.serialize_cdr(self.ts.types["std_msgs/msg/String"](data=text), "std_msgs/msg/String")


def custom_metadata(path: Path) -> dict:
    info = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    return json.loads(info["custom_data"]["qvla.metadata"])


def record(rec: DatasetRecorder, src: Source, ticks: int, start: int = 0) -> None:
    for k in range(start, start + ticks):
        for topic, stamp, data in src.tick(k):
            rec.put(topic, stamp, data)


def small(root, **kw) -> DatasetRecorder:
    kw.setdefault("min_free_bytes", 1 << 20)
    return DatasetRecorder(root, CFG, metadata={"task": "test"}, **kw)


def test_episodes_from_raw_bytes_read_back_and_numbering_resumes(tmp_path):
    src = Source()
    with small(tmp_path / "ds") as rec:
        assert rec.start(instruction_cdr=src.instruction("stack the blocks")) == 0
        record(rec, src, 30)
        info = rec.stop(success=True)
        assert info.path == tmp_path / "ds" / "episode_000000" and info.outcome == "kept" and info.dropped == 0
        assert info.messages == 30 * 7 and set(info.topics) == set(CFG.all_topics()) - {
            CFG.instruction.topic,
            CFG.success.topic,
            CFG.metadata.topic,
        }
        rec.start(instruction="discard me")
        record(rec, src, 5)
        gone = rec.discard()
        assert gone.path is None and not (tmp_path / "ds" / "episode_000001").exists()
        with pytest.raises(RecorderError, match="no episode is recording"):
            rec.stop()
    ep = read_episode(tmp_path / "ds" / "episode_000000", horizon=5)
    assert ep.instruction == "stack the blocks" and ep.success is True and len(ep) >= 28
    assert ep.metadata["task"] == "test" and ep.metadata["source"] == "ros" and ep.metadata["dropped"] == 0
    cam = CFG.cameras[0].topic
    assert ep.metadata["topics"][cam]["messages"] == 30 and ep.metadata["topics"][cam]["drops"]["queue"] == 0
    # a second session continues after the numbers used so far (the discarded one's too)
    with small(tmp_path / "ds") as rec:
        assert rec.next_index == 2
        rec.start(instruction="again")
        record(rec, src, 10)
        rec.stop()
    assert [p.name for p in list_episodes(tmp_path / "ds")] == ["episode_000000", "episode_000002"]
    log = [json.loads(line) for line in (tmp_path / "ds" / "episodes.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["kept", "discarded", "kept"]


def test_disk_margin_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(RecorderError, match=r"free on the disk holding .* less than the margin of .*min_free_gb"):
        small(tmp_path / "ds", min_free_bytes=1 << 62).open()
    rec = small(tmp_path / "ds").open()
    try:
        rec.min_free_bytes = 1 << 62  # the disk filled up meanwhile
        with pytest.raises(RecorderError, match="less than the margin"):
            rec.start()
    finally:
        rec.close()


def test_a_writer_that_cannot_keep_up_drops_and_counts_per_topic(tmp_path, monkeypatch):
    real = EpisodeWriter.write_raw

    def slow(self, topic, stamp, data):
        time.sleep(0.002)
        return real(self, topic, stamp, data)

    monkeypatch.setattr(EpisodeWriter, "write_raw", slow)
    src = Source(size=(16, 16))
    with small(tmp_path / "ds", max_queue_bytes=3000) as rec:
        rec.start(instruction="hurry")
        record(rec, src, 40)
        rec.count_lost(CFG.arms[0].state.topic, 3, "sequence_gap")
        info = rec.stop()
    cam = CFG.cameras[0].topic
    t = info.topics[cam]
    assert t["drops"]["queue"] > 0 and t["messages"] + t["drops"]["queue"] == 40, t
    assert info.topics[CFG.arms[0].state.topic]["drops"]["sequence_gaps"] == 3
    meta = custom_metadata(info.path)  # (read_episode would refuse it: every right-arm message was dropped)
    assert meta["dropped"] == info.dropped == sum(v["dropped"] for v in meta["topics"].values()) > 0
    # the file holds exactly the messages that were not dropped
    scan = scan_mcap(next(info.path.glob("*.mcap")))
    ids = [cid for cid, ch in scan.channels.items() if ch.topic == cam]
    assert sum(m.channel_id in ids for m in scan.messages) == t["messages"]


def test_sequence_gaps_per_publisher():
    s = SequenceTracker()
    assert [s.gap("/a", b"p", n) for n in (5, 6, 9, 9, 8, 10)] == [0, 0, 2, 0, 0, 0]
    assert s.gap("/a", b"q", 100) == 0 and s.gap("/b", b"p", 7) == 0 and s.gap("/a", b"p", None) == 0


def test_flush_hands_every_message_so_far_to_the_os(tmp_path):
    src = Source()
    w = EpisodeWriter(tmp_path / "ep", CFG, flush_every_s=1000.0).open()
    for topic, stamp, data in src.tick(0) + src.tick(1):
        w.write_raw(topic, stamp, data)
    flushed = w.flush(fsync=True)
    assert sum(flushed.values()) == 14
    scan = scan_mcap(next((tmp_path / "ep").glob("*.mcap")))  # the file as a crash would leave it
    assert len(scan.messages) == 14 and not scan.damaged and scan.stop
    w.close()


CRASH = """
import os, sys, time
sys.path[:0] = [{src!r}, {tests!r}]
from test_recorder import CFG, Source, record
from qvla_ros.episodes.recorder import DatasetRecorder
flushed = []
rec = DatasetRecorder({root!r}, CFG, min_free_bytes=1 << 20, flush_every_s=0.1, fsync=False,
                      on_flush=lambda c: flushed.append(c))
rec.open()
rec.start(instruction="crash test")
src = Source()
record(rec, src, 20)
while not flushed or sum(flushed[-1].values()) < 140:
    time.sleep(0.05)
print(sum(flushed[-1].values()), flush=True)
record(rec, src, 5, start=20)  # never flushed
os._exit(9)  # no close, no cleanup: as if killed
"""


def crash(root: Path) -> int:
    code = CRASH.format(src=str(REPO / "src"), tests=str(Path(__file__).parent), root=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("mode", ["aside", "keep", "report"])
def test_an_interrupted_episode_is_found_at_start(tmp_path, mode):
    root = tmp_path / "ds"
    flushed = crash(root)
    assert flushed >= 140
    rec = small(root, recover=mode).open()
    try:
        (entry,) = rec.recovered
        if mode == "report":
            assert "qvla-episodes repair" in entry["message"] and (root / ".partial" / "episode_000000").is_dir()
        else:
            where = root / ".recovered" / "episode_000000" if mode == "aside" else root / "episode_000000"
            assert Path(entry["path"]) == where and entry["messages"] >= flushed
            ep = read_episode(where)
            assert ep.instruction == "crash test" and ep.success is None
            assert [p.name for p in list_episodes(root)] == (["episode_000000"] if mode == "keep" else [])
        assert rec.next_index == 1  # the interrupted episode keeps its number
    finally:
        rec.close()


# ---------------------------------------------------------------------------- keys
def test_key_parser_handles_split_sequences_and_a_lone_escape():
    p = KeyParser()
    assert p.feed(b"\x1b[C", now=0.0) == ["right"]
    assert p.feed(b"\x1b", now=1.0) == [] and p.feed(b"[", now=1.01) == [] and p.feed(b"D", now=1.02) == ["left"]
    assert p.feed(b"\x1b", now=2.0) == [] and p.flush(now=2.0 + ESC_TIMEOUT_S / 2) == []
    assert p.flush(now=2.0 + 2 * ESC_TIMEOUT_S) == ["esc"]
    assert p.feed(b"\x1bq", now=3.0) == ["esc", "q"] and p.feed(b"\x1bOC x", now=4.0) == ["right", " ", "x"]


def test_terminal_keys_on_a_pseudo_terminal_restore_the_terminal():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        got, seen = [], threading.Event()

        def on_key(k):
            got.append(k)
            if k == "esc":
                seen.set()

        keys = TerminalKeys(on_key, fd=slave)
        assert keys.active
        with keys:
            during = termios.tcgetattr(slave)
            assert not during[3] & termios.ICANON and not during[3] & termios.ECHO  # keys arrive without Enter
            os.write(master, b"\x1b[C")
            time.sleep(0.1)
            os.write(master, b"\x1b[D\x1b")
            assert seen.wait(2.0)
        assert got == ["right", "left", "esc"]
        assert termios.tcgetattr(slave) == before  # put back exactly as it was
    finally:
        os.close(master)
        os.close(slave)
    r, w = os.pipe()
    try:
        assert not TerminalKeys(print, fd=r).active  # not a terminal: nothing is read or changed
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------- the scripted teleoperators
def test_teleop_for_each_rig():
    from qvla_ros.sim.kinematic_rig import KinematicRig
    from qvla_ros.sim.teleop import SweepTeleop, make_teleop

    rig = KinematicRig(camera_names=())
    t = make_teleop(rig)
    assert isinstance(t, SweepTeleop)
    t.reset(rig)
    q = np.array([t.act(rig, k / 30) for k in range(90)])
    assert q.shape == (90, 14) and np.ptp(q, axis=0).min() > 0.05 and (q[:, [6, 13]] >= 0).all()
    pytest.importorskip("mujoco")
    from qvla_ros.sim.expert import TransferCubeExpert
    from qvla_ros.sim.rig import SimRig

    with SimRig(camera_names=()) as sim:
        assert isinstance(make_teleop(sim), TransferCubeExpert)
    with SimRig(task="insertion", camera_names=()) as sim, pytest.raises(ValueError, match="insertion"):
        make_teleop(sim)
