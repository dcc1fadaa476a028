"""Soak test of the policy node: three 480x640 rgb8 cameras at 30 Hz + arm states for minutes, over real DDS.

    .venv/bin/python bench/bench_soak.py                    # 10 minutes, models/sim_transfer_cube_w4, CPU
    .venv/bin/python bench/bench_soak.py --minutes 0.5      # a quick try
    .venv/bin/python bench/bench_soak.py --policy models/sim_transfer_cube_fp --device cuda

Three processes, all on this machine over the shared-memory DDS profile (qvla_ros.dds) on their own ROS_DOMAIN_ID:
  - the policy node, started through qvla_ros.bringup as `qvla-bringup` starts it (no simulated rig), with its
    inference worker process as its child;
  - a publisher (this file, --role publisher): three cameras at 30 Hz (frames rendered once from the simulated
    scene at 480x640, cycled), both arms' JointState at the same rate (the scene's start pose), the instruction;
  - this process: subscribes to the arm commands and /diagnostics, samples VmRSS of the others from /proc.

Printed at the end: the command rate and period p50/p99/max at this subscriber over the soak window (and the node's
own view), drops per camera from the node's /diagnostics camera entries (`frames`, `dropped`: gaps in the header
stamps) and from the publisher's own counts (frames sent, 30 Hz ticks it fell behind on), and the RSS growth
(start -> end of the window, and a least-squares slope) of each process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qvla_ros.dds import local_dds_environment  # noqa: E402

HEIGHT, WIDTH, RATE_HZ = 480, 640, 30.0


# ---------------------------------------------------------------------------------------------------------------
# /proc readers
def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MiB (None: gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of one process (not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------------
# the publisher process
def scene_frames(names: list[str], count: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray, str, str]:
    """`count` sets of 480x640 frames of the simulated scene (different cube placements), the start pose, the
    task's instruction, and where the images came from. Synthetic images when the scene cannot render here."""
    try:
        from qvla_ros.sim.rig import SimRig

        sets = []
        with SimRig(image_size=(HEIGHT, WIDTH), camera_names=tuple(names)) as rig:
            for k in range(count):
                o = rig.reset(seed=1000 + k)
                sets.append({n: np.ascontiguousarray(o.images[n]) for n in names})
            return sets, np.asarray(o.qpos, dtype=np.float64), rig.instruction, "simulated scene (MuJoCo)"
    except Exception as e:  # no GL here: the bench still measures transport and memory
        g = np.random.default_rng(0)
        sets = [{n: g.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for n in names} for _ in range(count)]
        pose = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
        return (
            sets,
            pose,
            "pick up the red cube with the right arm and hand it over to the left arm",
            (f"random noise (the scene did not render: {e})"),
        )


def run_publisher(args) -> int:
    import array

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from qvla_ros.control.params import POLICY_NODE
    from qvla_ros.nodes import qos

    d = POLICY_NODE.defaults()
    cams, topics = list(d["cameras.names"]), list(d["cameras.topics"])
    joints, state_topics = list(d["arms.joint_names"]), list(d["arms.state_topics"])
    sets, pose, instruction, source = scene_frames(cams, args.frame_sets)
    # array.array('B') is what the message field stores: assigning one skips rclpy's per-byte check of bytes
    payloads = [{n: array.array("B", s[n].tobytes()) for n in cams} for s in sets]

    rclpy.init()
    node = rclpy.create_node("qvla_soak_publisher")
    cam_pubs = [node.create_publisher(Image, t, qos("sensor_data")) for t in topics]
    state_pubs = [node.create_publisher(JointState, t, qos("sensor_data")) for t in state_topics]
    instr_pub = node.create_publisher(String, d["instruction.topic"], qos("transient_local"))
    instr_pub.publish(String(data=instruction))
    frame_ids = {c["name"]: c.get("frame_id", c["name"]) for c in _topics_yaml().get("cameras", [])}
    ex = SingleThreadedExecutor()  # nothing to receive; spun for discovery/graph events only
    ex.add_node(node)
    threading.Thread(target=ex.spin, daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    sent = {n: 0 for n in cams}
    before_match = {n: 0 for n in cams}
    behind_ticks = 0  # 30 Hz ticks skipped because the loop fell more than a period behind
    tick_times: list[float] = []
    period = 1.0 / RATE_HZ
    print(json.dumps({"event": "ready", "images": source, "pid": os.getpid()}), flush=True)
    next_t = time.monotonic()
    k = 0
    while not stop.is_set():
        now_t = time.monotonic()
        tick_times.append(now_t)
        stamp = node.get_clock().now().to_msg()
        frames = payloads[(k // 30) % len(payloads)]  # a new scene every second
        for name, pub in zip(cams, cam_pubs):
            msg = Image()
            msg.header.stamp = stamp
            msg.header.frame_id = frame_ids.get(name, name)
            msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = HEIGHT, WIDTH, "rgb8", 0, WIDTH * 3
            msg.data = frames[name]
            if pub.get_subscription_count() == 0:
                before_match[name] += 1
            else:
                sent[name] += 1
            pub.publish(msg)
        for i, pub in enumerate(state_pubs):
            msg = JointState()
            msg.header.stamp = stamp
            msg.name = joints[i * 7 : (i + 1) * 7]
            msg.position = pose[i * 7 : (i + 1) * 7].tolist()
            msg.velocity = [0.0] * 7
            pub.publish(msg)
        k += 1
        next_t += period
        delay = next_t - time.monotonic()
        if delay < -period:
            missed = int(-delay / period)
            behind_ticks += missed
            next_t += missed * period
            delay = next_t - time.monotonic()
        if delay > 0:
            stop.wait(delay)
    periods = np.diff(np.array(tick_times)) * 1e3 if len(tick_times) > 1 else np.zeros(1)
    print(
        json.dumps(
            {
                "event": "done",
                "sent": sent,
                "sent_before_subscriber": before_match,
                "behind_ticks": behind_ticks,
                "ticks": k,
                "tick_p99_ms": float(np.percentile(periods, 99)),
                "tick_max_ms": float(periods.max()),
            }
        ),
        flush=True,
    )
    ex.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def _topics_yaml() -> dict:
    import yaml

    from qvla_ros.paths import config_path

    try:
        return yaml.safe_load(Path(config_path("topics.yaml")).read_text()) or {}
    except Exception:
        return {}


# ---------------------------------------------------------------------------------------------------------------
# the orchestrator
class Watcher:
    """Receipt times of the left arm's commands; every /diagnostics message of the policy node."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState

        from qvla_ros.control.params import POLICY_NODE

        self.node = rclpy.create_node("qvla_soak_watcher")
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.diags: list[tuple[float, dict[str, dict]]] = []
        q = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        left = POLICY_NODE.defaults()["arms.names"][0]
        self.node.create_subscription(JointState, f"/qvla/master_arm_{left}/joint_states", self._on_cmd, q)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, q)
        self.ex = SingleThreadedExecutor()
        self.ex.add_node(self.node)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()

    def _on_cmd(self, msg):
        t = time.monotonic()
        with self.lock:
            self.times.append(t)

    def _on_diag(self, msg):
        t = time.monotonic()
        entry = {}
        for s in msg.status:
            if s.name.startswith("/qvla/policy_node: "):
                level = int.from_bytes(s.level, "little") if isinstance(s.level, bytes) else int(s.level)
                entry[s.name.split(": ", 1)[1]] = {
                    "level": level,
                    "message": s.message,
                    **{kv.key: kv.value for kv in s.values},
                }
        if entry:
            with self.lock:
                self.diags.append((t, entry))

    def latest(self, key: str) -> dict:
        with self.lock:
            for _, e in reversed(self.diags):
                if key in e:
                    return e[key]
        return {}

    def between(self, t0: float, t1: float = float("inf")) -> list[dict]:
        with self.lock:
            return [e for t, e in self.diags if t0 <= t <= t1]

    def streaming(self) -> bool:
        c = self.latest("commands")
        with self.lock:
            n = len(self.times)
        return bool(c) and c["level"] == 0 and n > 30

    def close(self):
        self.ex.shutdown()
        self.node.destroy_node()


class MemorySampler:
    """VmRSS and CPU seconds of named processes every `every` s; the set of pids is re-read each time."""

    def __init__(self, pids_fn, every: float):
        self.pids_fn = pids_fn
        self.every = every
        self.samples: dict[str, list[tuple[float, int, float, float | None]]] = {}  # name -> (t, pid, MiB, cpu s)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self):
        t = time.monotonic()
        for name, pid in self.pids_fn().items():
            r = rss_mb(pid)
            if r is not None:
                self.samples.setdefault(name, []).append((t, pid, r, cpu_seconds(pid)))

    def stop(self):
        self._stop.set()
        self.thread.join(timeout=5)

    def summary(self, t0: float, t1: float) -> dict[str, dict]:
        out = {}
        for name, rows in self.samples.items():
            w = [r for r in rows if t0 <= r[0] <= t1]
            if len(w) < 2:
                continue
            t = np.array([r[0] for r in w])
            m = np.array([r[2] for r in w])
            pids = sorted({r[1] for r in w})
            slope = float(np.polyfit((t - t[0]) / 60.0, m, 1)[0]) if len(w) >= 3 else float("nan")
            cpu = [(r[0], r[3]) for r in w if r[3] is not None and r[1] == w[-1][1]]
            cpu_pct = (
                100.0 * (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
                if len(cpu) >= 2 and cpu[-1][0] > cpu[0][0]
                else float("nan")
            )
            out[name] = {
                "pids": pids,
                "start": float(m[0]),
                "end": float(m[-1]),
                "growth": float(m[-1] - m[0]),
                "max": float(m.max()),
                "slope": slope,
                "cpu": cpu_pct,
            }
        return out


def run_soak(args) -> int:
    from qvla_ros.bringup import Bringup, node_set

    os.environ.update(local_dds_environment(args.domain_id))  # before rclpy is imported
    import rclpy

    log_dir = Path(tempfile.mkdtemp(prefix="qvla-soak-"))
    policy = Path(args.policy).resolve()
    specs, _ = node_set({"sim": "false", "policy": str(policy), "device": args.device})
    # the arm states come from the simulated scene's start pose: the sim profile's limits apply
    over = {"policy_node": {"safety.arm_profile": "sim", "policy.worker": args.worker}}
    specs = [dataclasses.replace(s, parameters={**s.parameters, **over.get(s.name, {})}) for s in specs]
    node_log = open(log_dir / "policy_node.log", "w")
    runner = Bringup(specs, domain_id=args.domain_id, output=node_log).start()

    pub_env = local_dds_environment(args.domain_id)
    pub_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), pub_env.get("PYTHONPATH", "")) if p)
    pub_env.update(PYTHONUNBUFFERED="1", LP_NUM_THREADS="1", OMP_NUM_THREADS="1")
    pub_err = open(log_dir / "publisher.log", "w")
    pub = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--role", "publisher", "--frame-sets", str(args.frame_sets)],
        env=pub_env,
        stdout=subprocess.PIPE,
        stderr=pub_err,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    pub_lines: list[dict] = []

    def read_pub():
        for line in pub.stdout:
            if line.startswith("{"):
                pub_lines.append(json.loads(line))

    reader = threading.Thread(target=read_pub, daemon=True)
    reader.start()

    rclpy.init()
    w = Watcher()
    node_pid = runner.procs["policy_node"].pid

    def pids():
        out = {"policy node": node_pid, "publisher": pub.pid, "bench (this process)": os.getpid()}
        workers = [p for p in w.latest("inference").get("worker_pids", "").split(",") if p.strip().isdigit()]
        for i, p in enumerate(workers):
            out["inference worker" + (f" {i}" if len(workers) > 1 else "")] = int(p)
        return out

    sampler = MemorySampler(pids, every=args.sample_every)
    t0 = t1 = 0.0
    result = {}
    try:
        end = time.monotonic() + args.startup_timeout
        while not w.streaming() and time.monotonic() < end:
            if runner.exited():
                raise RuntimeError(f"the policy node exited: {runner.exited()} (log: {node_log.name})")
            if pub.poll() is not None:
                raise RuntimeError(f"the publisher exited with {pub.returncode} (log: {pub_err.name})")
            time.sleep(0.2)
        if not w.streaming():
            last = w.latest("commands").get("message", "no diagnostics")
            raise RuntimeError(
                f"no unheld command stream within {args.startup_timeout:.0f} s (last: {last}; logs: {log_dir})"
            )
        print(
            f"streaming; settling {args.settle:.0f} s, then soaking {args.minutes:g} min ...",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(args.settle)
        sampler.sample()
        t0 = time.monotonic()
        held0 = int(w.latest("commands").get("held_ticks", 0))
        pred0 = int(w.latest("inference").get("predictions", 0))
        with w.lock:
            n0 = len(w.times)
        deadline = t0 + args.minutes * 60.0
        while time.monotonic() < deadline:
            if runner.exited() or pub.poll() is not None:
                raise RuntimeError(
                    f"a process exited during the soak (node: {runner.exited()}, publisher: "
                    f"{pub.poll()}; logs: {log_dir})"
                )
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        sampler.sample()
        t1 = time.monotonic()
        with w.lock:
            times = np.array(w.times[n0:])
        times = times[times <= t1]
        # the node's counters at the end: its next diagnostics, still with the cameras running (stopping the
        # publisher makes the node hold on stale cameras, which is not part of the soak)
        wait_end = t1 + 3.0
        while time.monotonic() < wait_end and not any("commands" in e for e in w.between(t1)):
            time.sleep(0.05)
        cmd, inf = w.latest("commands"), w.latest("inference")
        window_diags = w.between(t0, time.monotonic())  # the diagnostics published during the window
        # stop the publisher first: its totals, then the node's next diagnostics cover every frame it got
        pub.send_signal(signal.SIGINT)
        pub.wait(timeout=20)
        reader.join(timeout=5)
        t_pub = time.monotonic()
        wait_end = t_pub + 5.0
        cam0 = f"camera {_camera_names()[0]}"
        while time.monotonic() < wait_end and not any(cam0 in e for e in w.between(t_pub + 0.05)):
            time.sleep(0.1)
        final = [e for e in w.between(0.0) if cam0 in e]
        final = final[-1] if final else {}
        periods = np.diff(times) * 1e3
        done = next((x for x in pub_lines if x.get("event") == "done"), {})
        ready = next((x for x in pub_lines if x.get("event") == "ready"), {})
        node_p99 = [float(e["commands"]["period_p99_ms"]) for e in window_diags if "commands" in e]
        node_max = [float(e["commands"]["period_max_ms"]) for e in window_diags if "commands" in e]
        holds: dict[str, int] = {}
        for e in window_diags:
            c = e.get("commands", {})
            if c and c["level"] != 0:
                holds[c["message"]] = holds.get(c["message"], 0) + 1
        result = {
            "holds": holds,
            "count": int(times.size),
            "rate_hz": (times.size - 1) / (times[-1] - times[0]) if times.size > 1 else 0.0,
            "p50": float(np.percentile(periods, 50)) if periods.size else float("nan"),
            "p99": float(np.percentile(periods, 99)) if periods.size else float("nan"),
            "max": float(periods.max()) if periods.size else float("nan"),
            "node_p99": max(node_p99) if node_p99 else float("nan"),
            "node_max": max(node_max) if node_max else float("nan"),
            "held": int(cmd.get("held_ticks", 0)) - held0,
            "chunks": int(inf.get("predictions", 0)) - pred0,
            "inf_p50": float(inf.get("latency_p50_ms", "nan")),
            "inf_p99": float(inf.get("latency_p99_ms", "nan")),
            "restarts": inf.get("restarts", "?"),
            "cameras": {n: final.get(f"camera {n}", {}) for n in _camera_names()},
            "publisher": done,
            "images": ready.get("images", "?"),
            "memory": sampler.summary(t0 - 0.5, t1 + 0.5),
        }
    finally:
        sampler.stop()
        if pub.poll() is None:
            pub.send_signal(signal.SIGINT)
            try:
                pub.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pub.kill()
        w.close()
        rclpy.try_shutdown()
        runner.stop()
        node_log.close()
        pub_err.close()
    print_report(args, policy, result, t1 - t0, log_dir)
    return 0


def _camera_names() -> list[str]:
    from qvla_ros.control.params import POLICY_NODE

    return list(POLICY_NODE.defaults()["cameras.names"])


def print_report(args, policy: Path, r: dict, window: float, log_dir: Path) -> None:
    load = os.getloadavg()
    print(
        f"\nqvla soak: 3 cameras {WIDTH}x{HEIGHT} rgb8 at {RATE_HZ:.0f} Hz + arm states -> policy node "
        f"({policy.name}, {args.worker} worker, {args.device}); window {window / 60:.2f} min; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(f"images: {r['images']}; logs: {log_dir}\n")
    print(
        "commands (left arm, at a subscriber in another process, over the window; node: the worst of its own "
        "10 s p99/max reports)"
    )
    head = (
        f"{'cmd Hz':>7} {'count':>6} {'period p50':>10} {'p99':>7} {'max':>7} {'node p99':>8} {'node max':>8} "
        f"{'held':>5} {'chunks':>6} {'infer p50':>9} {'p99':>6} {'restarts':>8}"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{r['rate_hz']:7.2f} {r['count']:6d} {r['p50']:8.1f}ms {r['p99']:5.1f}ms {r['max']:5.1f}ms "
        f"{r['node_p99']:6.1f}ms {r['node_max']:6.1f}ms {r['held']:5d} {r['chunks']:6d} {r['inf_p50']:7.0f}ms "
        f"{r['inf_p99']:4.0f}ms {r['restarts']:>8}"
    )
    print("held: control ticks the safety filter held during the window; chunks: inferences")
    for message, n in sorted(r["holds"].items(), key=lambda x: -x[1]):
        print(f"  held at {n} of the node's 1 Hz diagnostics: {message[:200]}")

    pub = r["publisher"]
    print(
        "\ncameras (whole run: from the publisher's first frame with a subscriber to its last; node: its "
        "/diagnostics after the publisher stopped)"
    )
    head = (
        f"{'camera':<12} {'published':>9} {'node frames':>11} {'lost':>6} {'node dropped':>12} "
        f"{'out of order':>12} {'node Hz':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, c in r["cameras"].items():
        sent = int(pub.get("sent", {}).get(name, 0))
        frames = int(c.get("frames", 0))
        print(
            f"{name:<12} {sent:9d} {frames:11d} {sent - frames:6d} {c.get('dropped', '?'):>12} "
            f"{c.get('out_of_order', '?'):>12} {float(c.get('rate_hz', 'nan')):7.2f}"
        )
    print(
        f"publisher: {pub.get('ticks', '?')} ticks, {pub.get('behind_ticks', '?')} skipped for falling behind "
        f"30 Hz, tick period p99 {pub.get('tick_p99_ms', float('nan')):.1f} ms, max "
        f"{pub.get('tick_max_ms', float('nan')):.1f} ms; frames before the node subscribed: "
        f"{pub.get('sent_before_subscriber', {})}"
    )
    print("lost: published - received by the node; node dropped: the node's estimate from gaps in header stamps")

    print(
        "\nmemory (VmRSS from /proc/PID/status, sampled every "
        f"{args.sample_every:g} s over the window; slope: least-squares fit)"
    )
    head = (
        f"{'process':<22} {'pid':>8} {'RSS start':>10} {'end':>9} {'growth':>9} {'max':>9} {'slope':>11} {'CPU %':>6}"
    )
    print(head)
    print("-" * len(head))
    for name, m in r["memory"].items():
        pid = ",".join(str(p) for p in m["pids"])
        print(
            f"{name:<22} {pid:>8} {m['start']:8.1f}MB {m['end']:7.1f}MB {m['growth']:+7.1f}MB {m['max']:7.1f}MB "
            f"{m['slope']:+6.2f}MB/min {m['cpu']:6.0f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the measured window (default 10)")
    ap.add_argument("--policy", default=str(REPO / "models" / "sim_transfer_cube_w4"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", default="process", choices=("process", "thread"))
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after streaming starts before the window")
    ap.add_argument("--sample-every", type=float, default=2.0, help="RSS sampling period, s")
    ap.add_argument("--frame-sets", type=int, default=4, help="scene renders the publisher cycles through")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument(
        "--domain-id", type=int, default=226, help="ROS_DOMAIN_ID (default outside the 20-219 the tests pick from)"
    )
    ap.add_argument("--role", default="soak", choices=("soak", "publisher"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "publisher":
        return run_publisher(args)
    return run_soak(args)


if __name__ == "__main__":
    sys.exit(main())
