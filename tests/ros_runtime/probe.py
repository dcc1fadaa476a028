"""A ROS 2 probe the runtime tests start as a separate process: it watches the policy node's command stream over
DDS, drives scenarios (switch a simulated camera off and on, e-stop, reload the policy), and prints one JSON line.

    python probe.py stream   --adapter joint_state --seconds 10      rate, period jitter, limits, well-formedness
    python probe.py faults   --camera left_wrist                      hold within 200 ms, resume; e-stop
    python probe.py reload   --path DIR                               max command gap while the policy reloads

Times are taken when the probe's callbacks run (time.monotonic), so they include DDS delivery and the probe's
own scheduling: an upper bound of what the node itself does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Bool

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from qvla_msgs.msg import ActionChunk  # noqa: E402
from qvla_msgs.srv import ReloadPolicy  # noqa: E402
from qvla_ros.control.arm_outputs import make_arm_output  # noqa: E402
from qvla_ros.control.messages import import_message_type  # noqa: E402
from qvla_ros.control.params import POLICY_NODE  # noqa: E402
from qvla_ros.control.safety import load_arm_description  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
SENSOR = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
POLICY = "/qvla/policy_node"
SIM = "/qvla/sim_rig"


class Probe(Node):
    def __init__(self, output_name: str, profile: str):
        super().__init__("qvla_probe")
        d = POLICY_NODE.defaults()
        self.joints = d["arms.joint_names"]
        self.arm_output = make_arm_output(output_name, d["arms.names"], self.joints, time_from_start=1 / 30)
        self.desc = load_arm_description(REPO / "config" / "y1_arms.yaml", profile, self.joints)
        self.lock = threading.Lock()
        # (receipt of the left arm's message: one per control tick, 14-dim command with the right arm's latest,
        #  the message's header stamp: when the node's tick ran, or None for types without a header)
        self.samples: list[tuple[float, np.ndarray | None, float | None]] = []
        self.malformed: list[str] = []
        self._right_last = None
        self.diag: list[tuple[float, dict]] = []  # (receipt, {status name: (level, message, values)})
        self.chunks: list[tuple[float, str]] = []
        self.frames: dict[str, list[float]] = {}
        msg_type = import_message_type(self.arm_output.msg_type)
        for o in self.arm_output.arm_topics:
            self.create_subscription(msg_type, o.topic, lambda m, a=o.arm: self._on_cmd(a, m), RELIABLE)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, RELIABLE)
        self.create_subscription(ActionChunk, f"{POLICY}/action_chunk", self._on_chunk, RELIABLE)
        self.estop = self.create_publisher(Bool, "/qvla/estop", RELIABLE)
        self.set_sim = self.create_client(SetParameters, f"{SIM}/set_parameters")
        self.reload = self.create_client(ReloadPolicy, f"{POLICY}/reload_policy")

    def watch_camera(self, topic: str, name: str):
        self.frames[name] = []
        self.create_subscription(Image, topic, lambda m: self.frames[name].append(time.monotonic()), SENSOR)

    def _on_cmd(self, arm, msg):
        t = time.monotonic()
        try:
            q7 = self.arm_output.parse(msg, arm)
            self._check_form(arm, msg)
        except Exception as e:
            self.malformed.append(f"{arm}: {e}")
            return
        with self.lock:
            if arm == "right":
                self._right_last = q7
            else:
                right = self._right_last
                h = getattr(msg, "header", None)
                stamp = h.stamp.sec + h.stamp.nanosec * 1e-9 if h is not None and h.stamp.sec > 0 else None
                self.samples.append((t, None if right is None else np.concatenate([q7, right]), stamp))

    def _check_form(self, arm, msg):
        """Fields a consumer of each arm output relies on."""
        o = self.arm_output.arm_topic(arm)
        name = self.arm_output.name
        if name == "joint_state":
            assert list(msg.name) == list(o.joints), f"names {list(msg.name)}"
            assert len(msg.position) == 7 and msg.header.stamp.sec > 0, "position/stamp"
        elif name == "forward_command":
            assert len(msg.data) == 7 and msg.layout.dim[0].size == 7 and msg.layout.dim[0].label == "joints"
        elif name == "joint_trajectory":
            assert list(msg.joint_names) == list(o.joints) and len(msg.points) == 1
            p = msg.points[0]
            assert len(p.positions) == 7 and (p.time_from_start.sec, p.time_from_start.nanosec) != (0, 0)

    def _on_diag(self, msg):
        t = time.monotonic()
        entry = {
            s.name.split(": ", 1)[-1]: (
                int.from_bytes(s.level, "little") if isinstance(s.level, bytes) else int(s.level),
                s.message,
                {kv.key: kv.value for kv in s.values},
            )
            for s in msg.status
            if s.name.startswith(POLICY)
        }
        if entry:
            self.diag.append((t, entry))

    def _on_chunk(self, msg):
        self.chunks.append((time.monotonic(), msg.model_id))

    # -------------------------------------------------------------- helpers
    def spin_until(self, executor, cond, timeout):
        end = time.monotonic() + timeout
        while not cond() and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.01)
        return cond()

    def spin_for(self, executor, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.01)

    def call(self, executor, client, request, timeout=60.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"service {client.srv_name} not available")
        fut = client.call_async(request)
        self.spin_until(executor, fut.done, timeout)
        return fut.result()

    def set_cameras(self, executor, enabled: list[bool]):
        p = Parameter(
            name="sim.cameras_enabled",
            value=ParameterValue(type=ParameterType.PARAMETER_BOOL_ARRAY, bool_array_value=enabled),
        )
        res = self.call(executor, self.set_sim, SetParameters.Request(parameters=[p]))
        assert res.results[0].successful, res.results[0].reason

    def command_status(self, since: float):
        """[(t, level, message, values)] of the node's `commands` diagnostic after `since`."""
        return [(t, *d["commands"]) for t, d in self.diag if t >= since and "commands" in d]

    def stream_stats(self, t0: float, t1: float) -> dict:
        with self.lock:
            window = [(t, c, s) for t, c, s in self.samples if t0 <= t <= t1]
        times = np.array([t for t, _, _ in window])
        cmds = [c for _, c, _ in window if c is not None]
        stamps = np.array([s for _, _, s in window if s is not None])
        node_gaps = np.diff(stamps) * 1e3 if stamps.size > 1 else np.zeros(1)
        periods = np.diff(times)
        err = np.abs(periods - 1 / 30) if periods.size else np.zeros(1)
        q = np.array(cmds) if cmds else np.zeros((0, 14))
        lo, hi = self.desc.lower, self.desc.upper
        return {
            "count": int(times.size),
            "rate_hz": float((times.size - 1) / (times[-1] - times[0])) if times.size > 1 else 0.0,
            "period_p50_ms": float(np.percentile(periods, 50) * 1e3) if periods.size else 0.0,
            "period_p99_ms": float(np.percentile(periods, 99) * 1e3) if periods.size else 0.0,
            "period_max_ms": float(periods.max() * 1e3) if periods.size else 0.0,
            "period_error_p99_ms": float(np.percentile(err, 99) * 1e3),
            "non_finite": int((~np.isfinite(q)).any(axis=1).sum()),
            "outside_limits": int(((q < lo - 1e-9) | (q > hi + 1e-9)).any(axis=1).sum()),
            "distinct_commands": int(len({c.tobytes() for c in q})),
            "malformed": self.malformed[:5],
            # the same stream by the node's own tick stamps: publishing gaps, without delivery to this process
            "node_gap_max_ms": float(node_gaps.max()),
            "node_gap_p99_ms": float(np.percentile(node_gaps, 99)),
        }


def wait_streaming(probe, ex, timeout):
    """Until commands flow and the node reports it is not holding (the policy is driving)."""
    ok = probe.spin_until(
        ex, lambda: any(lvl == 0 for _, lvl, _, _ in probe.command_status(0.0)) and len(probe.samples) > 10, timeout
    )
    if not ok:
        last = probe.command_status(0.0)[-1:] or "no diagnostics"
        raise RuntimeError(f"the policy node never streamed unheld commands within {timeout} s (last: {last})")


def run_stream(probe, ex, args) -> dict:
    wait_streaming(probe, ex, args.timeout)
    probe.spin_for(ex, 1.0)  # past the first chunk's fade-in
    t0 = time.monotonic()
    probe.spin_for(ex, args.seconds)
    t1 = time.monotonic()
    out = probe.stream_stats(t0, t1)
    diags = probe.command_status(t0)
    out["held_diagnostics"] = sum(1 for _, lvl, _, _ in diags if lvl != 0)
    out["node"] = diags[-1][3] if diags else {}
    inf = [d["inference"][2] for t, d in probe.diag if t >= t0 and "inference" in d]
    out["inference"] = inf[-1] if inf else {}
    out["chunks"] = sum(1 for t, _ in probe.chunks if t0 <= t <= t1)
    return out


def _first(probe, since, pred):
    for t, lvl, msg, values in probe.command_status(since):
        if pred(lvl, msg, values):
            return t, msg
    return None, None


def run_faults(probe, ex, args) -> dict:
    d = POLICY_NODE.defaults()
    cam = args.camera
    idx = d["cameras.names"].index(cam)
    probe.watch_camera(d["cameras.topics"][idx], cam)
    wait_streaming(probe, ex, args.timeout)
    probe.spin_for(ex, 1.0)
    out = {}

    # ---- one camera stops
    enabled = [True] * len(d["cameras.names"])
    enabled[idx] = False
    t_set = time.monotonic()
    probe.set_cameras(ex, enabled)
    probe.spin_for(ex, 0.6)
    last_frame = max(probe.frames[cam])  # the camera is off: nothing newer arrives
    t_hold, msg = _first(probe, last_frame, lambda lvl, m, v: lvl != 0 and f"camera:{cam}" in v["hold_reasons"])
    out["camera_hold_after_last_frame_ms"] = None if t_hold is None else (t_hold - last_frame) * 1e3
    out["camera_hold_message"] = msg
    held = probe.stream_stats(t_hold + 0.05, time.monotonic()) if t_hold else {}
    out["commands_while_held"] = held.get("count", 0)
    out["distinct_commands_while_held"] = held.get("distinct_commands", -1)

    # ---- the camera comes back
    enabled[idx] = True
    t_on = time.monotonic()
    probe.set_cameras(ex, enabled)
    probe.spin_until(ex, lambda: _first(probe, t_on, lambda lvl, m, v: lvl == 0)[0] is not None, 10.0)
    t_resume, _ = _first(probe, t_on, lambda lvl, m, v: lvl == 0)
    out["camera_resume_after_restart_ms"] = None if t_resume is None else (t_resume - t_on) * 1e3
    probe.spin_for(ex, 1.0)
    after = probe.stream_stats(time.monotonic() - 0.8, time.monotonic())
    out["distinct_commands_after_resume"] = after["distinct_commands"]

    # ---- e-stop
    t_e = time.monotonic()
    probe.estop.publish(Bool(data=True))
    probe.spin_for(ex, 0.5)
    t_hold, msg = _first(probe, t_e, lambda lvl, m, v: lvl != 0 and "estop" in v["hold_reasons"])
    out["estop_hold_ms"] = None if t_hold is None else (t_hold - t_e) * 1e3
    held = probe.stream_stats(t_hold + 0.05, time.monotonic()) if t_hold else {}
    out["distinct_commands_while_estop"] = held.get("distinct_commands", -1)
    t_r = time.monotonic()
    probe.estop.publish(Bool(data=False))
    probe.spin_until(ex, lambda: _first(probe, t_r, lambda lvl, m, v: lvl == 0)[0] is not None, 10.0)
    t_resume, _ = _first(probe, t_r, lambda lvl, m, v: lvl == 0)
    out["estop_resume_ms"] = None if t_resume is None else (t_resume - t_r) * 1e3

    # ---- a failed inference: the worker process dies mid-stream (killed); the node holds, restarts it, resumes
    probe.spin_for(ex, 1.0)
    inf = [d["inference"][2] for _, d in probe.diag if "inference" in d]
    pid = int(inf[-1]["worker_pids"].split(",")[0])
    t_k = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    probe.spin_until(ex, lambda: _first(probe, t_k, lambda lvl, m, v: lvl != 0)[0] is not None, 5.0)
    t_hold, msg = _first(probe, t_k, lambda lvl, m, v: lvl != 0)
    out["worker_killed_hold_ms"] = None if t_hold is None else (t_hold - t_k) * 1e3
    out["worker_killed_message"] = msg
    probe.spin_until(ex, lambda: _first(probe, t_k + 0.1, lambda lvl, m, v: lvl == 0)[0] is not None, 90.0)
    t_resume, _ = _first(probe, t_k + 0.1, lambda lvl, m, v: lvl == 0)
    out["worker_restart_resume_s"] = None if t_resume is None else t_resume - t_k
    inf = [d["inference"][2] for _, d in probe.diag if "inference" in d]
    out["worker_restarts"] = int(inf[-1]["restarts"])
    out["worker_pid_changed"] = inf[-1]["worker_pids"] not in ("", str(pid))

    total = probe.stream_stats(0.0, time.monotonic())
    out["non_finite"], out["outside_limits"] = total["non_finite"], total["outside_limits"]
    out["stream_rate_hz"] = probe.stream_stats(t_set, time.monotonic())["rate_hz"]
    return out


def run_reload(probe, ex, args) -> dict:
    wait_streaming(probe, ex, args.timeout)
    probe.spin_for(ex, 1.0)
    before = {m for _, m in probe.chunks}
    t0 = time.monotonic()
    res = probe.call(ex, probe.reload, ReloadPolicy.Request(artifact_path=args.path), timeout=120.0)
    t1 = time.monotonic()
    probe.spin_for(ex, 1.5)
    t2 = time.monotonic()
    refused = probe.call(ex, probe.reload, ReloadPolicy.Request(artifact_path="/nonexistent/policy"))
    stats = probe.stream_stats(t0 - 0.2, t2)
    probe.spin_until(ex, lambda: probe.command_status(t2), 3.0)  # the node's own view of the same window
    node = probe.command_status(t2)
    return {
        "node_period_max_ms": float(node[-1][3]["period_max_ms"]) if node else None,
        "node_gap_max_ms": stats["node_gap_max_ms"],
        "node_gap_p99_ms": stats["node_gap_p99_ms"],
        "success": res.success,
        "message": res.message,
        "reload_seconds": t1 - t0,
        "max_gap_ms": stats["period_max_ms"],
        "period_p99_ms": stats["period_p99_ms"],
        "count": stats["count"],
        "models_before": sorted(before),
        "models_after": sorted({m for t, m in probe.chunks if t > t1 + 0.5}),
        "refused": {"success": refused.success, "message": refused.message},
        "non_finite": stats["non_finite"],
        "outside_limits": stats["outside_limits"],
    }


def run_sim(probe, ex, args) -> dict:
    """The simulated rig over ROS: camera images, latched success, EpisodeControl on the sim and the policy node."""
    from std_msgs.msg import Bool as BoolMsg

    from qvla_msgs.srv import EpisodeControl

    d = POLICY_NODE.defaults()
    frames = []
    probe.create_subscription(
        Image,
        d["cameras.topics"][0],
        lambda m: frames.append((m.width, m.height, m.encoding, m.step, len(m.data), m.header.frame_id)),
        SENSOR,
    )
    success = []
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    probe.create_subscription(BoolMsg, "/qvla/episode/success", lambda m: success.append(m.data), latched)
    sim_ep = probe.create_client(EpisodeControl, "/qvla/sim/episode")
    pol_ep = probe.create_client(EpisodeControl, f"{POLICY}/episode")
    wait_streaming(probe, ex, args.timeout)
    start = probe.call(ex, sim_ep, EpisodeControl.Request(command=EpisodeControl.Request.START))
    t_start = time.monotonic()
    pstart = probe.call(ex, pol_ep, EpisodeControl.Request(command=EpisodeControl.Request.START))
    # after START the node holds until it has an arm state and a chunk from after the reset
    probe.spin_until(ex, lambda: any(lvl == 0 for _, lvl, _, _ in probe.command_status(t_start)), 30.0)
    t0 = time.monotonic()
    probe.spin_for(ex, args.seconds)
    stats = probe.stream_stats(t0, time.monotonic())
    stop = probe.call(ex, sim_ep, EpisodeControl.Request(command=EpisodeControl.Request.STOP))
    t_stop = time.monotonic()
    pstop = probe.call(ex, pol_ep, EpisodeControl.Request(command=EpisodeControl.Request.STOP))
    probe.spin_for(ex, 0.5)
    held = probe.command_status(t_stop)  # the node reports the hold at once (and at 1 Hz after)
    return {
        "start": [start.success, start.episode_id, start.message],
        "policy_start": [pstart.success, pstart.message],
        "stop": json.loads(stop.message) if stop.success else stop.message,
        "policy_stop": [pstop.success, pstop.message],
        "frame": frames[-1] if frames else None,
        "frames": len(frames),
        "success_msgs": success[:3],
        "stream": stats,
        "held_after_stop": [m for _, lvl, m, _ in held if lvl != 0][:1],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("stream", "faults", "reload", "sim"))
    ap.add_argument("--adapter", default="joint_state")
    ap.add_argument("--profile", default="sim")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--camera", default="left_wrist")
    ap.add_argument("--path", default="")
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args()
    rclpy.init()
    try:
        probe = Probe(args.adapter, args.profile)
        ex = SingleThreadedExecutor()
        ex.add_node(probe)
        modes = {"stream": run_stream, "faults": run_faults, "reload": run_reload, "sim": run_sim}
        out = modes[args.mode](probe, ex, args)
    finally:
        rclpy.try_shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
