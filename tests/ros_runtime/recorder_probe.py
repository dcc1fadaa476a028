"""A ROS 2 probe the recorder tests start as a separate process: it drives the recorder node over EpisodeControl,
counts what it sees on every recorded topic itself (an independent subscriber), follows the recorder's ~/status, and
prints one JSON line.

    python recorder_probe.py episode --seconds 3          START, record, STOP: the recorder's answers and own counts
    python recorder_probe.py flushed --min-frames 30      START, then wait until that many camera frames are flushed
                                                          to the OS (the recorder's status says so); prints the
                                                          flushed counts and leaves the episode running (for SIGKILL)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from qvla_msgs.srv import EpisodeControl  # noqa: E402
from qvla_ros.control.messages import import_message_type  # noqa: E402
from qvla_ros.episodes.topics import load_topic_config  # noqa: E402

RECORDER = "/qvla/recorder"
SENSOR = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


class Probe(Node):
    def __init__(self):
        super().__init__("recorder_probe")
        self.topics = load_topic_config()
        self.seen: dict[str, list[float]] = {}
        for cam in self.topics.cameras:
            self._watch(cam.topic, cam.type, SENSOR)
        for arm in self.topics.arms:
            self._watch(arm.state.topic, arm.state.type, SENSOR)
            self._watch(arm.command.topic, arm.command.type, RELIABLE)
        self.status: list[dict] = []
        self.create_subscription(
            String, f"{RECORDER}/status", lambda m: self.status.append(json.loads(m.data)), RELIABLE
        )
        self.episode = self.create_client(EpisodeControl, f"{RECORDER}/episode")

    def _watch(self, topic, type_name, profile):
        self.seen[topic] = []
        self.create_subscription(
            import_message_type(type_name),
            topic,
            lambda m, t=topic: self.seen[t].append(time.monotonic()),
            profile,
            raw=True,
        )

    def spin_until(self, ex, cond, timeout):
        end = time.monotonic() + timeout
        while not cond() and time.monotonic() < end:
            ex.spin_once(timeout_sec=0.01)
        return cond()

    def call(self, ex, command: int, **kw):
        if not self.episode.wait_for_service(timeout_sec=60.0):
            raise RuntimeError(f"{RECORDER}/episode not available")
        fut = self.episode.call_async(EpisodeControl.Request(command=command, **kw))
        self.spin_until(ex, fut.done, 60.0)
        return fut.result()


def wait_flowing(probe, ex, timeout):
    """Until every camera and arm topic has delivered messages to the probe (the rig streams)."""
    ok = probe.spin_until(ex, lambda: all(len(v) > 5 for v in probe.seen.values()), timeout)
    if not ok:
        raise RuntimeError(f"topics not flowing: { {t: len(v) for t, v in probe.seen.items()} }")
    probe.spin_until(ex, lambda: probe.status, 20.0)


def run_episode(probe, ex, args) -> dict:
    wait_flowing(probe, ex, args.timeout)
    start = probe.call(ex, EpisodeControl.Request.START)
    t0 = time.monotonic()
    end = t0 + args.seconds
    while time.monotonic() < end:
        ex.spin_once(timeout_sec=0.01)
    t1 = time.monotonic()
    stop = probe.call(ex, EpisodeControl.Request.STOP, outcome=EpisodeControl.Request.OUTCOME_SUCCESS)
    second = probe.call(ex, EpisodeControl.Request.STOP)  # nothing recording: refused with a reason
    return {
        "start": [start.success, start.episode_id, start.message],
        "stop": json.loads(stop.message) if stop.success else stop.message,
        "stop_ok": stop.success,
        "second_stop": [second.success, second.message],
        "seen": {t: sum(1 for x in v if t0 <= x <= t1) for t, v in probe.seen.items()},
        "window_s": t1 - t0,
        "status": probe.status[-1] if probe.status else {},
    }


def run_flushed(probe, ex, args) -> dict:
    wait_flowing(probe, ex, args.timeout)
    start = probe.call(ex, EpisodeControl.Request.START, instruction="pick up the probe's cube")
    cams = [c.topic for c in probe.topics.cameras]

    def enough():
        return any(
            s.get("state") == "recording" and all(s.get("flushed", {}).get(c, 0) >= args.min_frames for c in cams)
            for s in probe.status
        )

    ok = probe.spin_until(ex, enough, args.timeout)
    last = [s for s in probe.status if s.get("flushed")][-1] if ok else (probe.status[-1] if probe.status else {})
    return {"start": [start.success, start.episode_id], "ok": ok, "flushed": last.get("flushed", {}), "status": last}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("episode", "flushed"))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--min-frames", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args()
    rclpy.init()
    try:
        probe = Probe()
        ex = SingleThreadedExecutor()
        ex.add_node(probe)
        out = {"episode": run_episode, "flushed": run_flushed}[args.mode](probe, ex, args)
    finally:
        rclpy.try_shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
