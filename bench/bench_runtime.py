"""Benchmark of the ROS 2 runtime while inference runs: command-period jitter (p50/p99/max) at a subscriber in
another process, camera-to-command latency, inference latency, and CPU use of the policy node (+ its worker).

    .venv/bin/python bench/bench_runtime.py                         # both worker kinds, small π0, kinematic rig
    .venv/bin/python bench/bench_runtime.py --workers process --sim mujoco --seconds 20
    .venv/bin/python bench/bench_runtime.py --policy models/...     # a real checkpoint or artifact

The rig is started through qvla_ros.bringup (the same processes as `qvla-bringup` and `make demo`) with
policy.min_interval 0 so that inference runs back to back: the control loop's worst case. The default policy is a
random-weight π0 with the sizes of the trained sim checkpoint (SmallPi0Spec(): ~150 ms per chunk on one core).
Numbers depend on everything else the machine runs: the table prints the load average next to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qvla_ros.bringup import Bringup, node_set  # noqa: E402
from qvla_ros.dds import local_dds_environment  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and its children (the inference worker)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Watcher:
    """Receipt times of the left arm's commands and the policy node's latest diagnostics."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState

        self.node = rclpy.create_node("qvla_bench")
        self.times: list[float] = []
        self.diag: dict[str, dict[str, str]] = {}
        q = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(
            JointState, "/qvla/master_arm_left/joint_states", lambda m: self.times.append(time.monotonic()), q
        )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, q)
        self.ex = SingleThreadedExecutor()
        self.ex.add_node(self.node)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()

    def _on_diag(self, msg):
        for s in msg.status:
            if s.name.startswith("/qvla/policy_node: "):
                self.diag[s.name.split(": ", 1)[1]] = {
                    "level": int.from_bytes(s.level, "little") if isinstance(s.level, bytes) else int(s.level),
                    "message": s.message,
                    **{kv.key: kv.value for kv in s.values},
                }

    def streaming(self) -> bool:
        c = self.diag.get("commands")
        return bool(c) and c["level"] == 0 and len(self.times) > 30

    def close(self):
        self.ex.shutdown()
        self.node.destroy_node()


def run_one(args, worker: str, policy: Path, log_dir: Path) -> dict:
    specs, _ = node_set({"sim": "true", "sim_backend": args.sim, "policy": str(policy), "device": args.device})
    over = {"policy_node": {"policy.worker": worker, "policy.min_interval": 0.0}}
    specs = [dataclasses.replace(s, parameters={**s.parameters, **over.get(s.name, {})}) for s in specs]
    log = open(log_dir / f"nodes-{worker}.log", "w")
    runner = Bringup(specs, output=log).start()
    w = Watcher()
    try:
        end = time.monotonic() + args.startup_timeout
        while not w.streaming() and time.monotonic() < end:
            if runner.exited():
                raise RuntimeError(f"a node exited: {runner.exited()} (log: {log.name})")
            time.sleep(0.1)
        if not w.streaming():
            raise RuntimeError(f"no unheld command stream within {args.startup_timeout} s (log: {log.name})")
        time.sleep(2.0)  # let the first chunks' fade-in and the worker's first predictions settle
        pid = runner.procs["policy_node"].pid
        held0 = int(w.diag.get("commands", {}).get("held_ticks", 0))
        pred0 = int(w.diag.get("inference", {}).get("predictions", 0))
        n0, c0, t0 = len(w.times), cpu_seconds(pid), time.monotonic()
        time.sleep(args.seconds)
        n1, c1, t1 = len(w.times), cpu_seconds(pid), time.monotonic()
        time.sleep(1.1)  # the next diagnostics message covers the window's end
        times = np.array(w.times[n0:n1])
        periods = np.diff(times) * 1e3
        inf, cmd = dict(w.diag.get("inference", {})), dict(w.diag.get("commands", {}))
    finally:
        w.close()
        runner.stop()
        log.close()
    return {
        "worker": worker,
        "rate_hz": (len(times) - 1) / (times[-1] - times[0]),
        "p50": float(np.percentile(periods, 50)),
        "p99": float(np.percentile(periods, 99)),
        "max": float(periods.max()),
        "err_p99": float(np.percentile(np.abs(periods - 1000 / 30), 99)),
        "c2c_p50": float(inf.get("camera_to_command_p50_ms", "nan")),
        "c2c_p99": float(inf.get("camera_to_command_p99_ms", "nan")),
        "inf_p50": float(inf.get("latency_p50_ms", "nan")),
        "inf_p99": float(inf.get("latency_p99_ms", "nan")),
        "node_p99": float(cmd.get("period_p99_ms", "nan")),
        "node_max": float(cmd.get("period_max_ms", "nan")),
        "sched": cmd.get("scheduling", "?"),
        "cpu": 100.0 * (c1 - c0) / (t1 - t0),
        "held": int(cmd.get("held_ticks", 0)) - held0,
        "predictions": int(inf.get("predictions", 0)) - pred0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="process,thread", help="comma-separated: process, thread")
    ap.add_argument("--policy", default="small", help="small (default), tiny, or a policy directory")
    ap.add_argument("--sim", default="kinematic", choices=("kinematic", "mujoco"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--domain-id", type=int, default=150)
    args = ap.parse_args()

    os.environ.update(local_dds_environment(args.domain_id))  # before rclpy is imported
    import rclpy

    tmp = Path(tempfile.mkdtemp(prefix="qvla-bench-"))
    if args.policy in ("small", "tiny"):
        from qvla_ros.policy.model import SmallPi0Spec
        from qvla_ros.policy.tiny import TINY_SPEC, make_tiny_policy

        spec = SmallPi0Spec() if args.policy == "small" else TINY_SPEC
        policy = make_tiny_policy(tmp / f"{args.policy}_pi0", seed=0, spec=spec)
    else:
        policy = Path(args.policy)
    rclpy.init()
    rows = []
    try:
        for worker in args.workers.split(","):
            print(f"running {worker} worker for {args.seconds:.0f} s ...", file=sys.stderr, flush=True)
            rows.append(run_one(args, worker.strip(), policy, tmp))
    finally:
        rclpy.try_shutdown()
    load = os.getloadavg()
    print(
        f"\nqvla runtime bench: {args.policy} π0 policy ({policy.name}), {args.sim} rig, {args.seconds:.0f} s per "
        f"row, {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        "command period measured at a subscriber in another process; node p99/max: the node's own tick periods "
        "(last 10 s); latencies and CPU from the policy node (CPU = node + inference worker, % of one core)\n"
    )
    head = (
        f"{'worker':<8} {'cmd Hz':>7} {'period p50':>10} {'p99':>7} {'max':>7} {'|err| p99':>9} "
        f"{'node p99':>8} {'max':>6} "
        f"{'cam->cmd p50':>12} {'p99':>7} {'infer p50':>9} {'p99':>7} {'CPU %':>6} {'chunks':>6} {'held':>5}"
    )
    # chunks: inferences during the window (about); held: control ticks the safety filter held (about)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['worker']:<8} {r['rate_hz']:7.2f} {r['p50']:8.1f}ms {r['p99']:5.1f}ms {r['max']:5.1f}ms "
            f"{r['err_p99']:7.1f}ms {r['node_p99']:6.1f}ms {r['node_max']:4.0f}ms {r['c2c_p50']:10.0f}ms "
            f"{r['c2c_p99']:5.0f}ms {r['inf_p50']:7.0f}ms "
            f"{r['inf_p99']:5.0f}ms {r['cpu']:6.0f} {r['predictions']:>6} {r['held']:>5}"
        )
    print("\ncontrol thread scheduling: " + ", ".join(f"{r['worker']} worker: {r['sched']}" for r in rows))
    print(f"node logs: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
