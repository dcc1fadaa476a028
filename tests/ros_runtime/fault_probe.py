"""Fault injection against a running policy node, from outside (a separate process over DDS), for
test_policy_node_faults.py: this process is the rig. It publishes three cameras and both arm states at 30 Hz and
the instruction, injects one fault at a time into what it publishes (malformed images, mixed resolutions, NaN /
infinite / impossible states, wrong joints, stamps jumping forward and back, a camera that stops), calls the
node's services (reloads that fail and succeed in every order, episode control), and watches the command stream
and /diagnostics with its own subscriber. It prints one JSON line: per phase, when the node held and why, what it
sent while holding, when it resumed, and whether every service call was answered.

    python fault_probe.py --good DIR --good2 DIR --bad DIR [--profile real]

The node is expected to start with a policy path that fails to load (--bad): the first phase reloads a good one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import POLICY, SENSOR, Probe  # noqa: E402

from qvla_msgs.srv import EpisodeControl, ReloadPolicy  # noqa: E402
from qvla_ros.control.params import POLICY_NODE  # noqa: E402

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
RATE = 30.0


class Injector(Probe):
    """The Probe's watchers plus a rig that publishes, with one fault applied at a time."""

    def __init__(self, profile: str, size=(48, 64)):
        super().__init__("joint_state", profile)
        d = POLICY_NODE.defaults()
        self.cam_names = d["cameras.names"]
        self.cam_pubs = {
            n: self.create_publisher(Image, t, SENSOR) for n, t in zip(self.cam_names, d["cameras.topics"])
        }
        self.arm_names = d["arms.names"]
        self.state_pubs = {
            a: self.create_publisher(JointState, t, SENSOR) for a, t in zip(self.arm_names, d["arms.state_topics"])
        }
        self.instruction = self.create_publisher(String, d["instruction.topic"], LATCHED)
        self.episode = self.create_client(EpisodeControl, f"{POLICY}/episode")
        self.size = {n: size for n in self.cam_names}
        self._pixels: dict[tuple[int, int], bytes] = {}  # one random frame per size: publishing stays cheap
        self.pose = (self.desc.lower + self.desc.upper) / 2  # mid-range joints, gripper half open
        self.fault: dict = {}
        self.first_faulty: float | None = None  # when the current fault was first published
        self.stopped: set[str] = set()
        self.create_timer(1.0 / RATE, self._publish)

    def set_fault(self, **fault):
        self.fault = fault
        self.first_faulty = None

    def _image(self, name: str, stamp) -> Image | None:
        h, w = self.size[name]
        f = self.fault
        img = Image()
        img.header.stamp = stamp
        img.header.frame_id = name
        img.height, img.width, img.encoding, img.step = h, w, "rgb8", 3 * w
        if (h, w) not in self._pixels:
            self._pixels[(h, w)] = np.random.default_rng(h * w).integers(0, 256, h * w * 3, dtype=np.uint8).tobytes()
        data = self._pixels[(h, w)]
        if f.get("camera") == name:
            kind = f["kind"]
            if kind == "encoding":
                img.encoding = "yuv422"
            elif kind == "step":
                img.step = 2 * w
            elif kind == "truncated":
                data = data[: len(data) // 2]
            elif kind == "zero_size":
                img.height = img.width = img.step = 0
                data = b""
        img.data = data
        return img

    def _publish(self):
        now = self.get_clock().now()
        t = now.nanoseconds * 1e-9
        f = self.fault
        faulty = False
        for name in self.cam_names:
            if name in self.stopped:
                faulty = faulty or f.get("kind") == "stop"
                continue
            stamp = now.to_msg()
            if f.get("camera") == name and f.get("kind") == "stamp_offset":
                shifted = t + f["offset"]
                stamp.sec, stamp.nanosec = int(shifted), int((shifted % 1) * 1e9)
                if f.get("once"):
                    self.fault = {}
            self.cam_pubs[name].publish(self._image(name, stamp))
            faulty = faulty or f.get("camera") == name
        for k, arm in enumerate(self.arm_names):
            msg = JointState()
            msg.header.stamp = now.to_msg()
            joints = list(self.arm_output.arm_topic(arm).joints)
            q = [float(x) for x in self.pose[7 * k : 7 * k + 7]]
            if f.get("arm") == arm:
                faulty = True
                kind = f["kind"]
                if kind == "value":
                    q[f.get("joint", 2)] = f["value"]
                elif kind == "count":
                    joints, q = joints[:6], q[:6]
                elif kind == "names":
                    joints = [f"joint_{i}" for i in range(7)]
                elif kind == "unnamed_count":
                    joints, q = [], q[:6]
            msg.name, msg.position = joints, q
            self.state_pubs[arm].publish(msg)
        if faulty and self.first_faulty is None:
            self.first_faulty = time.monotonic()


def _held_since(probe, since, word):
    """First 'commands' diagnostic after `since` that holds with `word` in its message."""
    for t, lvl, msg, _values in probe.command_status(since):
        if lvl != 0 and word in msg:
            return t, msg
    return None, None


def _unheld_since(probe, since):
    for t, lvl, _msg, _ in probe.command_status(since):
        if lvl == 0:
            return t
    return None


def phase(probe, ex, name, word, apply, clear, hold_for=0.6, resume_timeout=10.0, expect_hold=True):
    """Apply a fault, measure the hold (from the first faulty message published), clear it, measure the resume."""
    t_apply = time.monotonic()
    apply()
    probe.spin_for(ex, hold_for)
    out = {"phase": name}
    t0 = probe.first_faulty or t_apply
    if expect_hold:
        probe.spin_until(ex, lambda: _held_since(probe, t_apply, word)[0] is not None, 3.0)
        t_hold, msg = _held_since(probe, t_apply, word)
        out["hold_ms"] = None if t_hold is None else (t_hold - t0) * 1e3
        out["message"] = msg
        if t_hold is None:
            out["last_messages"] = [m for _, _, m, _ in probe.command_status(t_apply)][-3:]
        held = probe.stream_stats(t_hold + 0.1, time.monotonic()) if t_hold is not None else {}
        out["commands_while_held"] = held.get("count", 0)
        out["distinct_while_held"] = held.get("distinct_commands", -1)
    else:
        out["held_messages"] = [m for _, lvl, m, _ in probe.command_status(t_apply + 0.1) if lvl != 0][:3]
        stats = probe.stream_stats(t_apply + 0.3, time.monotonic())
        out["distinct_commands"] = stats["distinct_commands"]
        out["chunks"] = sum(1 for t, _ in probe.chunks if t >= t_apply + 0.3)
    t_clear = time.monotonic()
    clear()
    probe.spin_until(ex, lambda: _unheld_since(probe, t_clear) is not None, resume_timeout)
    t_resume = _unheld_since(probe, t_clear)
    out["resume_ms"] = None if t_resume is None else (t_resume - t_clear) * 1e3
    probe.spin_for(ex, 0.3)
    return out


def service_call(probe, ex, client, request, timeout=60.0):
    """(answered, success, message): a call that gets no answer within `timeout` is reported, not raised."""
    if not client.wait_for_service(timeout_sec=10.0):
        return False, False, "service not available"
    fut = client.call_async(request)
    probe.spin_until(ex, fut.done, timeout)
    if not fut.done():
        return False, False, f"no answer within {timeout:.0f} s"
    r = fut.result()
    return True, bool(r.success), str(r.message)


def run(probe, ex, args) -> dict:
    out: dict = {"phases": [], "services": []}
    probe.instruction.publish(String(data="transfer the cube"))

    def reload(path):
        res = service_call(probe, ex, probe.reload, ReloadPolicy.Request(artifact_path=str(path)), timeout=120.0)
        out["services"].append(["reload", str(path), *res])
        return res

    def episode(cmd):
        res = service_call(probe, ex, probe.episode, EpisodeControl.Request(command=cmd), timeout=20.0)
        out["services"].append(["episode", int(cmd), *res])
        return res

    # ---- the first load fails: the node holds and says why; a good reload makes it drive
    probe.spin_until(ex, lambda: _held_since(probe, 0.0, "policy load failed")[0] is not None, 60.0)
    out["first_load"] = _held_since(probe, 0.0, "policy load failed")[1]
    t = time.monotonic()
    reload(args.good)
    probe.spin_until(ex, lambda: _unheld_since(probe, t) is not None, 60.0)
    t_resume = _unheld_since(probe, t)
    out["reload_after_failed_first_load_resume_s"] = None if t_resume is None else t_resume - t
    probe.spin_for(ex, 1.0)

    cams, arms = probe.cam_names, probe.arm_names
    ph = out["phases"]

    def fault(**f):
        return lambda: probe.set_fault(**f)

    def none():
        probe.set_fault()

    # ---- images
    for kind, word in (
        ("encoding", "encoding 'yuv422'"),
        ("step", "step"),
        ("truncated", "truncated"),
        ("zero_size", "empty image"),
    ):
        ph.append(phase(probe, ex, f"image_{kind}", word, fault(camera=cams[0], kind=kind), none))

    # ---- cameras of different resolutions are a normal rig: no hold, the policy drives
    def mixed():
        probe.size[cams[0]] = (480, 640)
        probe.size[cams[1]] = probe.size[cams[2]] = (240, 320)

    def small():
        for n in cams:
            probe.size[n] = (48, 64)

    ph.append(phase(probe, ex, "mixed_resolutions", "", mixed, small, hold_for=2.0, expect_hold=False))

    # ---- a camera stops, then resumes
    ph.append(
        phase(
            probe,
            ex,
            "camera_stops",
            "stale",
            lambda: (probe.stopped.add(cams[1]), probe.set_fault(kind="stop")),
            lambda: (probe.stopped.clear(), probe.set_fault()),
        )
    )

    # ---- stamps: one frame far in the future (then normal stamps: the stream restarts its timeline by itself);
    # a camera whose clock runs 2 s behind (named as going backwards, then as a clock mismatch)
    ph.append(
        phase(
            probe,
            ex,
            "stamp_jumps_forward",
            "backwards",
            fault(camera=cams[0], kind="stamp_offset", offset=10.0, once=True),
            none,
            hold_for=0.5,
        )
    )
    p = phase(
        probe,
        ex,
        "stamp_jumps_back",
        "backwards",
        fault(camera=cams[2], kind="stamp_offset", offset=-2.0),
        none,
        hold_for=2.5,
    )
    p["clock_mismatch_message"] = next(
        (m for _, lvl, m, _ in probe.command_status(0.0) if lvl != 0 and "clocks disagree" in m), None
    )
    ph.append(p)

    # ---- arm states
    for kind, value, word in (
        ("value", float("nan"), "non-finite"),
        ("value", float("inf"), "non-finite"),
        ("value", 100.0, "outside its limits"),
        ("count", None, "lacks"),
        ("names", None, "lacks"),
        ("unnamed_count", None, "expected 7 values"),
    ):
        ph.append(phase(probe, ex, f"state_{kind}_{value}", word, fault(arm=arms[1], kind=kind, value=value), none))

    # the node's step limit holds over everything so far (an episode START below may jump to the measured state)
    with probe.lock:
        q = np.array([c for _, c, _ in probe.samples if c is not None])
    steps = np.abs(np.diff(q, axis=0)) if len(q) > 1 else np.zeros((1, 14))
    out["max_step_ratio"] = float((steps / (probe.desc.max_velocity / RATE)).max())

    # ---- reloads in every order of outcomes, each followed by an episode call: the services must keep answering
    reload(args.bad)  # fails (exists, not a policy): the running policy keeps driving
    reload(args.good2)  # succeeds (a second severity at the same log site killed the services thread once)
    reload(args.bad)
    reload("/nonexistent/policy")
    episode(EpisodeControl.Request.STOP)
    probe.spin_for(ex, 0.3)
    out["paused_message"] = _held_since(probe, time.monotonic() - 0.3, "episode stopped")[1]
    t = time.monotonic()
    episode(EpisodeControl.Request.START)
    probe.spin_until(ex, lambda: _unheld_since(probe, t) is not None, 30.0)
    out["resume_after_start"] = _unheld_since(probe, t) is not None
    reload(args.good)
    episode(EpisodeControl.Request.START)
    out["models_seen"] = sorted({m for _, m in probe.chunks})

    total = probe.stream_stats(0.0, time.monotonic())
    out["non_finite"], out["outside_limits"] = total["non_finite"], total["outside_limits"]
    out["count"], out["malformed"] = total["count"], total["malformed"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--good", required=True)
    ap.add_argument("--good2", required=True)
    ap.add_argument("--bad", required=True)
    ap.add_argument("--profile", default="real")
    args = ap.parse_args()
    rclpy.init()
    try:
        probe = Injector(args.profile)
        ex = SingleThreadedExecutor()
        ex.add_node(probe)
        out = run(probe, ex, args)
    finally:
        rclpy.try_shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
