"""A ROS 2 probe for the monitor node tests, started as a separate process: it watches the monitor's ActionDeviation,
markers and diagnostics and the policy node's chunks over DDS, drives episodes, and prints one JSON line.

    python monitor_probe.py --deviations 4                       collect deviations and marker updates
    python monitor_probe.py --deviations 3 --episode-start       ... then START an episode on the policy node,
                                                                 collect 2 more of the new episode
    python monitor_probe.py --deviations 3 --fallback-model M    ... then wait until the monitor's fallback has fired
                                                                 and --after-fallback chunks of model M are compared
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from visualization_msgs.msg import MarkerArray

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from qvla_msgs.msg import ActionChunk, ActionDeviation  # noqa: E402
from qvla_msgs.srv import EpisodeControl  # noqa: E402

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
MONITOR = "/qvla/monitor"
POLICY = "/qvla/policy_node"
FIELDS = (
    "episode",
    "episode_step",
    "model_id",
    "reference_id",
    "arm_names",
    "first_action_l2",
    "chunk_l2",
    "cumulative_l2",
    "first_action_l2_total",
    "chunk_l2_total",
    "cumulative_l2_total",
    "cumulative_first_action_l2_total",
    "max_joint_deviation",
    "max_joint_name",
    "max_joint_step",
    "tracking_l2",
    "tracking_age",
    "reference_latency",
    "compared",
    "skipped",
    "unmatched",
)


def _json_value(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


class MonitorProbe(Node):
    def __init__(self):
        super().__init__("qvla_monitor_probe")
        self.t0 = time.monotonic()
        self.deviations: list[dict] = []
        self.markers: list[list[dict]] = []
        self.diag: list[tuple[float, dict]] = []
        self.chunks: list[dict] = []
        self.create_subscription(ActionDeviation, f"{MONITOR}/deviation", self._on_dev, RELIABLE)
        self.create_subscription(MarkerArray, f"{MONITOR}/markers", self._on_markers, RELIABLE)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, RELIABLE)
        self.create_subscription(ActionChunk, f"{POLICY}/action_chunk", self._on_chunk, RELIABLE)
        self.episode = self.create_client(EpisodeControl, f"{POLICY}/episode")

    def _on_dev(self, m):
        d = {k: _json_value(getattr(m, k)) for k in FIELDS}
        d["t"] = time.monotonic() - self.t0
        d["stamp"] = [m.header.stamp.sec, m.header.stamp.nanosec]
        self.deviations.append(d)

    def _on_markers(self, arr):
        self.markers.append(
            [
                {
                    "ns": mk.ns,
                    "id": mk.id,
                    "type": mk.type,
                    "frame": mk.header.frame_id,
                    "action": mk.action,
                    "n": len(mk.points),
                    "finite": all(math.isfinite(c) for p in mk.points for c in (p.x, p.y, p.z)),
                    "colour": [mk.color.r, mk.color.g, mk.color.b, mk.color.a],
                    "scale": [mk.scale.x, mk.scale.y, mk.scale.z],
                    "first": [mk.points[0].x, mk.points[0].y, mk.points[0].z] if mk.points else None,
                }
                for mk in arr.markers
            ]
        )

    def _on_diag(self, msg):
        entry = {
            s.name.split(": ", 1)[-1]: [
                int.from_bytes(s.level, "little") if isinstance(s.level, bytes) else int(s.level),
                s.message,
                {kv.key: kv.value for kv in s.values},
            ]
            for s in msg.status
            if s.name.startswith(MONITOR)
        }
        if entry:
            self.diag.append((time.monotonic() - self.t0, entry))

    def _on_chunk(self, m):
        self.chunks.append(
            {
                "t": time.monotonic() - self.t0,
                "model_id": m.model_id,
                "episode": m.episode,
                "cameras": list(m.camera_names),
                "stamps": len(m.camera_stamps),
                "state": len(m.state),
                "instruction": m.instruction,
            }
        )

    def spin_until(self, ex, cond, timeout):
        end = time.monotonic() + timeout
        while not cond() and time.monotonic() < end:
            ex.spin_once(timeout_sec=0.02)
        return cond()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deviations", type=int, default=4)
    ap.add_argument("--episode-start", action="store_true")
    ap.add_argument("--fallback-model", default="")
    ap.add_argument("--after-fallback", type=int, default=2, help="deviations of the fallback model to collect")
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args()
    rclpy.init()
    out: dict = {}
    try:
        p = MonitorProbe()
        ex = SingleThreadedExecutor()
        ex.add_node(p)
        out["got_deviations"] = p.spin_until(ex, lambda: len(p.deviations) >= args.deviations, args.timeout)
        if args.episode_start:
            n_before = len(p.deviations)
            if not p.episode.wait_for_service(timeout_sec=30):
                raise RuntimeError("policy node episode service not available")
            fut = p.episode.call_async(EpisodeControl.Request(command=EpisodeControl.Request.START))
            p.spin_until(ex, fut.done, 30)
            res = fut.result()
            out["episode_response"] = [res.success, res.episode_id, res.message]
            out["got_new_episode"] = p.spin_until(
                ex, lambda: sum(d["episode"] == int(res.episode_id) for d in p.deviations[n_before:]) >= 2, 60
            )
        if args.fallback_model:

            def done():
                fired = any(e.get("fallback", [0, "", {}])[2].get("fired") == "True" for _, e in p.diag)
                return fired and sum(d["model_id"] == args.fallback_model for d in p.deviations) >= args.after_fallback

            out["fallback_done"] = p.spin_until(ex, done, args.timeout)
        # diagnostics (1 Hz) that already count the last deviation
        t_last = p.deviations[-1]["t"] if p.deviations else 0.0
        p.spin_until(ex, lambda: any(t > t_last + 0.05 for t, _ in p.diag), 5.0)
        out.update(
            deviations=p.deviations,
            markers=p.markers[-6:],
            marker_updates=len(p.markers),
            diag=p.diag[-40:],
            chunks=p.chunks[-50:],
            n_chunks=len(p.chunks),
        )
    finally:
        rclpy.try_shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
