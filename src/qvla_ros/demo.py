"""`make demo`: the simulated two-arm rig driven over ROS 2 by the committed QVLA-quantized π0 policy.

    python -m qvla_ros.demo                                  # models/sim_transfer_cube_w4, 5 episodes
    python -m qvla_ros.demo --episodes 20 --policy models/sim_transfer_cube_fp
    python -m qvla_ros.demo --random-policy                  # no checkpoint: a random π0 (success is meaningless)
    python -m qvla_ros.demo --monitor                        # + the monitor node: each episode's action deviation
    QVLA_DEMO_MONITOR=1 make demo                            # the same through make

It starts the sim rig and the policy node through qvla_ros.bringup (the processes `qvla-bringup sim:=true` starts),
runs N episodes (reset the scene, let the policy drive until the task succeeds or time runs out), prints a live line
(command rate, inference latency, episode, success so far), and writes a report (JSON + text) with the success rate
and the timing to runs/demo-<time>/ (node output in nodes.log next to it). With --monitor the monitor node runs the
full-precision reference (--reference, default the artifact's source policy) on the policy's exact observations and
the report gives each episode's cumulative action deviation (Eq. 5) up to the episode's end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from qvla_quant.files import is_artifact

DEFAULT_POLICY = "models/sim_transfer_cube_w4"
DEFAULT_REFERENCE = "models/sim_transfer_cube_fp"
RANDOM_NOTE = (
    "NOTE: --random-policy: the policy is a freshly made RANDOM-WEIGHT π0. The graph, timing and safety "
    "behaviour are real; its success rate is MEANINGLESS."
)


class DemoError(RuntimeError):
    """Something the user can fix (missing policy, missing ROS install, a node that did not start)."""


def _resolve_policy(args) -> tuple[Path, bool]:
    if args.random_policy:
        from qvla_ros.policy.tiny import make_tiny_policy

        out = Path(args.run_dir) / "random_policy"
        out.parent.mkdir(parents=True, exist_ok=True)
        return make_tiny_policy(out, seed=args.seed), True
    # relative to the working directory: `make demo` runs from the repository root, where models/ is (this module
    # may be the installed copy, so its own location says nothing about the checkout)
    p = Path(args.policy).expanduser()
    if p.exists():
        return p.resolve(), False
    models = Path.cwd() / "models"
    have = sorted(x.name for x in models.iterdir() if x.is_dir()) if models.is_dir() else []
    raise DemoError(
        f"policy {args.policy} not found. "
        + (
            f"Policies in {models}: {', '.join(have)} (pass one with --policy). "
            if have
            else f"{models} holds no policy yet. "
        )
        + "To try the ROS graph without a trained checkpoint, add --random-policy (a random π0: timing is real, "
        "success is meaningless)."
    )


def _resolve_reference(args, policy: Path, random_policy: bool) -> Path:
    """The monitor's full-precision reference: --reference, else the artifact's recorded source policy, else
    DEFAULT_REFERENCE; a float policy (and --random-policy) is its own reference (deviation 0 by construction)."""
    from qvla_ros.bringup import recorded_source

    if args.reference:
        ref = Path(args.reference).expanduser()
        if not ref.is_dir():
            raise DemoError(f"--reference {args.reference} not found (give the full-precision policy directory)")
        return ref.resolve()
    if random_policy or not is_artifact(policy):
        return policy
    source = recorded_source(str(policy))
    for cand in (source, DEFAULT_REFERENCE):
        if cand and Path(cand).is_dir():
            return Path(cand).resolve()
    raise DemoError(f"--monitor needs the full-precision reference of {policy}: pass --reference DIR")


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def _float(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _episode_deviation_text(e: dict) -> str:
    if "monitor" not in e:
        return ""
    m = e["monitor"]
    if not m:
        return "  cumulative deviation n/a (no chunk compared)"
    return (
        f"  cumulative deviation {m['cumulative_deviation']:.3f} over {m['chunks_compared']} chunks (mean "
        f"{m['mean_chunk_deviation']:.3f}, max {m['max_chunk_deviation']:.3f} per chunk)"
    )


def _check_ros() -> None:
    import importlib.util

    missing = [m for m in ("rclpy", "qvla_msgs") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(
            f"{' and '.join(missing)} not importable: run `make setup` (or source your ROS 2 install and "
            "build qvla_msgs) and use the venv's Python"
        )


class Monitor:
    """The demo's own ROS node: command receipt times, the policy node's diagnostics, success, services."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Bool

        from qvla_msgs.msg import QuantizationStatus
        from qvla_msgs.srv import EpisodeControl

        self.EpisodeControl = EpisodeControl
        self.node = rclpy.create_node("qvla_demo")
        rel = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.times: list[float] = []
        self.diag: dict[str, dict] = {}
        self.success = False
        self.quant: dict = {}
        self.node.create_subscription(
            JointState, "/qvla/master_arm_left/joint_states", lambda m: self.times.append(time.monotonic()), rel
        )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, rel)
        self.node.create_subscription(Bool, "/qvla/episode/success", self._on_success, latched)
        self.node.create_subscription(
            QuantizationStatus, "/qvla/policy_node/quantization_status", self._on_quant, latched
        )
        # the monitor node's deviations (monitor:=true): per policy-node episode number, (stamp, fields) per chunk
        from qvla_msgs.msg import ActionDeviation

        self.deviations: dict[int, list[tuple[float, dict]]] = {}
        self.monitor_diag: dict[str, dict] = {}
        self.node.create_subscription(ActionDeviation, "/qvla/monitor/deviation", self._on_deviation, rel)
        self.sim_episode = self.node.create_client(EpisodeControl, "/qvla/sim/episode")
        self.policy_episode = self.node.create_client(EpisodeControl, "/qvla/policy_node/episode")
        self.ex = SingleThreadedExecutor()
        self.ex.add_node(self.node)
        threading.Thread(target=self.ex.spin, daemon=True).start()

    def _on_diag(self, msg):
        for s in msg.status:
            for prefix, store in (("/qvla/policy_node: ", self.diag), ("/qvla/monitor: ", self.monitor_diag)):
                if s.name.startswith(prefix):
                    level = int.from_bytes(s.level, "little") if isinstance(s.level, bytes) else int(s.level)
                    store[s.name.split(": ", 1)[1]] = {
                        "level": level,
                        "message": s.message,
                        **{kv.key: kv.value for kv in s.values},
                    }

    def _on_deviation(self, m):
        stamp = m.header.stamp.sec + m.header.stamp.nanosec * 1e-9
        self.deviations.setdefault(int(m.episode), []).append(
            (
                stamp,
                {
                    "episode_step": int(m.episode_step),
                    "chunk": float(m.chunk_l2_total),
                    "first_action": float(m.first_action_l2_total),
                    "cumulative": float(m.cumulative_l2_total),
                    "cumulative_first_action": float(m.cumulative_first_action_l2_total),
                    "max_joint": float(m.max_joint_deviation),
                    "max_joint_name": m.max_joint_name,
                    "tracking": [float(x) for x in m.tracking_l2],
                    "skipped": int(m.skipped),
                    "unmatched": int(m.unmatched),
                    "reference_id": m.reference_id,
                },
            )
        )

    def monitor_ready(self) -> bool:
        return self.monitor_diag.get("reference", {}).get("status") == "running"

    def episode_deviation(self, episode: int, until: float) -> dict | None:
        """The monitor's view of policy-node episode `episode` over the chunks observed up to `until` (wall time)."""
        rows = [d for t, d in self.deviations.get(episode, []) if t <= until]
        if not rows:
            return None
        last = rows[-1]
        chunks = [d["chunk"] for d in rows]
        return {
            "cumulative_deviation": last["cumulative"],
            "cumulative_first_action_deviation": last["cumulative_first_action"],
            "chunks_compared": last["episode_step"],
            "mean_chunk_deviation": float(np.mean(chunks)),
            "max_chunk_deviation": float(np.max(chunks)),
            "max_joint_deviation": max(d["max_joint"] for d in rows),
            "skipped_total": last["skipped"],
            "unmatched_total": last["unmatched"],
            "reference_id": last["reference_id"],
        }

    def live_deviation(self, episode: int) -> float | None:
        rows = self.deviations.get(episode)
        return rows[-1][1]["cumulative"] if rows else None

    def _on_success(self, msg):
        self.success = bool(msg.data)

    def _on_quant(self, msg):
        self.quant = {
            "artifact_id": msg.artifact_id,
            "average_bits": msg.average_bits,
            "plan_hash": msg.plan_hash,
            "weight_bytes": msg.weight_bytes,
            "fp_weight_bytes": msg.fp_weight_bytes,
        }

    def value(self, status: str, key: str, default=float("nan")) -> float:
        try:
            return float(self.diag.get(status, {}).get(key, default))
        except ValueError:
            return default

    def streaming(self) -> bool:
        c = self.diag.get("commands")
        return bool(c) and c["level"] == 0

    def rate(self, window: float = 2.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.times[-200:] if now - t <= window]
        return (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 else 0.0

    def call(self, client, command: int, timeout: float = 30.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise DemoError(f"service {client.srv_name} did not appear within {timeout:.0f} s (see nodes.log)")
        fut = client.call_async(self.EpisodeControl.Request(command=command))
        end = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < end:
            time.sleep(0.01)
        if not fut.done():
            raise DemoError(f"{client.srv_name} did not answer within {timeout:.0f} s")
        res = fut.result()
        if not res.success:
            raise DemoError(f"{client.srv_name}: {res.message}")
        return res

    def close(self):
        self.ex.shutdown()
        self.node.destroy_node()


class Live:
    """One status line: rewritten in place on a terminal, printed every few seconds otherwise (CI logs)."""

    def __init__(self, stream=sys.stdout, every: float = 3.0):
        self.stream, self.tty, self.every, self.last = stream, stream.isatty(), every, 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif force or now - self.last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now

    def done(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def run(args) -> dict:
    from qvla_ros.bringup import Bringup, node_set
    from qvla_ros.dds import local_dds_environment

    run_dir = Path(args.run_dir)
    policy, random_policy = _resolve_policy(args)  # first: a missing policy leaves no empty run folder behind
    run_dir.mkdir(parents=True, exist_ok=True)
    if random_policy:
        print(f"\n{'!' * 100}\n{RANDOM_NOTE}\n{'!' * 100}\n", flush=True)
    os.environ.update(local_dds_environment(args.domain_id))  # this process's own ROS node, before rclpy starts
    import rclpy

    launch = {"sim": "true", "policy": str(policy), "device": args.device, "sim_backend": args.sim_backend}
    reference = _resolve_reference(args, policy, random_policy) if args.monitor else None
    if reference is not None:
        launch.update(monitor="true", reference=str(reference))
    specs, notes = node_set(launch)
    for n in notes:
        print(f"note: {n}")
    log = open(run_dir / "nodes.log", "w")
    print(
        f"policy {policy}"
        + (f"\nreference {reference} (monitor node)" if reference is not None else "")
        + f"\nstarting the sim rig, the policy node{' and the monitor' if reference is not None else ''} "
        f"(output: {run_dir / 'nodes.log'})",
        flush=True,
    )
    runner = Bringup(specs, domain_id=args.domain_id, output=log).start()
    rclpy.init()
    mon = Monitor()
    live = Live()
    episodes = []
    t_start = time.monotonic()
    try:
        end = time.monotonic() + args.startup_timeout
        while not mon.streaming() or (reference is not None and not mon.monitor_ready()):
            if runner.exited() or time.monotonic() > end:
                log.flush()
                tail = (run_dir / "nodes.log").read_text()[-3000:]
                raise DemoError(
                    f"the nodes did not start streaming commands ({runner.exited() or 'timeout'}); "
                    f"last node output:\n{tail}"
                )
            what = (
                f"waiting for the policy node: {mon.diag.get('commands', {}).get('message', 'starting')}"
                if not mon.streaming()
                else f"waiting for the monitor: {mon.monitor_diag.get('reference', {}).get('message', 'starting')}"
            )
            live.show(what)
            time.sleep(0.2)
        live.done(f"streaming: {mon.diag['commands']['message']}; policy {mon.diag['inference'].get('model_id')}")
        for k in range(args.episodes):
            mon.call(mon.policy_episode, mon.EpisodeControl.Request.STOP)
            start = mon.call(mon.sim_episode, mon.EpisodeControl.Request.START)
            mon.success = False
            policy_start = mon.call(mon.policy_episode, mon.EpisodeControl.Request.START)
            t0 = time.monotonic()
            t_success = None
            while time.monotonic() - t0 < args.episode_seconds:
                if runner.exited():
                    raise DemoError(f"a node exited during episode {k + 1}: {runner.exited()} (see nodes.log)")
                if mon.success and t_success is None:
                    t_success = time.monotonic() - t0
                    if not args.full_episodes:
                        break
                wins = sum(e["succeeded"] for e in episodes)
                live.show(
                    f"episode {k + 1}/{args.episodes} {time.monotonic() - t0:4.1f}/{args.episode_seconds:.0f} s"
                    f" | cmd {mon.rate():4.1f} Hz | infer p50 {mon.value('inference', 'latency_p50_ms'):4.0f} ms"
                    f" | cam->cmd p50 {mon.value('inference', 'camera_to_command_p50_ms'):4.0f} ms"
                    f" | success {wins}/{len(episodes)}"
                    + (" | SUCCEEDED" if t_success is not None else "")
                    + (
                        f" | dev Σ {_fmt(mon.live_deviation(int(policy_start.episode_id)))}"
                        if reference is not None
                        else ""
                    )
                )
                time.sleep(0.1)
            stop = mon.call(mon.sim_episode, mon.EpisodeControl.Request.STOP)
            t_stop = time.time()  # the ROS clock of the nodes: chunks observed after this are not this episode's
            outcome = json.loads(stop.message)
            outcome.update(
                episode=k + 1, wall_seconds=time.monotonic() - t0, time_to_success=t_success, start=start.message
            )
            if reference is not None:
                ep = int(policy_start.episode_id)
                end = time.monotonic() + 2.0  # the monitor lags by a reference prediction: let it catch up
                while time.monotonic() < end and not any(t > t_stop for t, _ in mon.deviations.get(ep, [])):
                    time.sleep(0.05)
                outcome["monitor"] = mon.episode_deviation(ep, t_stop)
            episodes.append(outcome)
            wins = sum(e["succeeded"] for e in episodes)
            live.done(
                f"episode {k + 1}/{args.episodes}: {'SUCCESS' if outcome['succeeded'] else 'no success'} "
                f"(seed {outcome['seed']}, max reward {outcome['max_reward']}, sim {outcome['sim_time']:.1f} s)"
                f" | success so far {wins}/{len(episodes)}"
                + (
                    f" | cumulative deviation {_fmt((outcome['monitor'] or {}).get('cumulative_deviation'))}"
                    if reference is not None
                    else ""
                )
            )
        mon.call(mon.policy_episode, mon.EpisodeControl.Request.STOP)
        periods = np.diff(np.array(mon.times)) * 1e3
        wall = time.monotonic() - t_start
        report = {
            "policy": str(policy),
            "random_policy": random_policy,
            "model_id": mon.diag.get("inference", {}).get("model_id", ""),
            "quantization": mon.quant,
            "episodes": episodes,
            "success_rate": sum(e["succeeded"] for e in episodes) / max(len(episodes), 1),
            "timing": {
                "command_rate_hz": (len(mon.times) - 1) / (mon.times[-1] - mon.times[0]) if len(mon.times) > 2 else 0,
                "command_period_p50_ms": float(np.percentile(periods, 50)) if periods.size else None,
                "command_period_p99_ms": float(np.percentile(periods, 99)) if periods.size else None,
                "command_period_max_ms": float(periods.max()) if periods.size else None,
                **{
                    k: mon.value("inference", k)
                    for k in (
                        "latency_p50_ms",
                        "latency_p99_ms",
                        "camera_to_command_p50_ms",
                        "camera_to_command_p99_ms",
                    )
                },
                "held_ticks": mon.value("commands", "held_ticks"),
                "ticks": mon.value("commands", "ticks"),
            },
            "wall_seconds": wall,
            "episode_seconds": args.episode_seconds,
            "sim_backend": args.sim_backend,
            "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
        }
        if reference is not None:
            seen = [e["monitor"] for e in episodes if e.get("monitor")]
            report["monitor"] = {
                "reference": str(reference),
                "episodes_with_deviation": len(seen),
                "mean_cumulative_deviation": float(np.mean([m["cumulative_deviation"] for m in seen]))
                if seen
                else None,
                "chunks_compared": int(sum(m["chunks_compared"] for m in seen)),
                "skipped_total": max((m["skipped_total"] for m in seen), default=0),
                "unmatched_total": max((m["unmatched_total"] for m in seen), default=0),
                "reference_latency_p50_ms": _float(mon.monitor_diag.get("reference", {}).get("latency_p50_ms")),
            }
        return report
    finally:
        mon.close()
        rclpy.try_shutdown()
        runner.stop()
        log.close()


def write_report(report: dict, run_dir: Path) -> tuple[Path, Path]:
    t = report["timing"]
    eps = report["episodes"]
    lines = [
        "qvla demo report",
        f"policy: {report['policy']} ({report['model_id']})",
    ]
    if report["random_policy"]:
        lines.append(RANDOM_NOTE)
    q = report.get("quantization") or {}
    if q:
        lines.append(
            f"quantization: {q.get('artifact_id')} average {q.get('average_bits', 0):.2f} bits, "
            f"{q.get('weight_bytes', 0) / 1e6:.1f} MB of weights "
            f"(full precision {q.get('fp_weight_bytes', 0) / 1e6:.1f} MB)"
        )
    lines += [
        f"success rate: {sum(e['succeeded'] for e in eps)}/{len(eps)} = {report['success_rate']:.0%}",
        f"commands: {t['command_rate_hz']:.2f} Hz, period p50 {t['command_period_p50_ms'] or 0:.1f} ms, "
        f"p99 {t['command_period_p99_ms'] or 0:.1f} ms, max {t['command_period_max_ms'] or 0:.1f} ms",
        f"inference: p50 {t['latency_p50_ms']:.0f} ms, p99 {t['latency_p99_ms']:.0f} ms; camera to command: "
        f"p50 {t['camera_to_command_p50_ms']:.0f} ms, p99 {t['camera_to_command_p99_ms']:.0f} ms",
        f"held ticks: {t['held_ticks']:.0f} of {t['ticks']:.0f} (resets, waiting for the first chunk, stale inputs)",
        "episodes:",
        *[
            f"  {e['episode']:>3}  seed {e['seed']:<6} {'success' if e['succeeded'] else 'fail   '}  max reward "
            f"{e['max_reward']}  sim {e['sim_time']:5.1f} s"
            + (f"  succeeded after {e['time_to_success']:.1f} s" if e["time_to_success"] is not None else "")
            + _episode_deviation_text(e)
            for e in eps
        ],
        f"wall time {report['wall_seconds']:.0f} s on {report['machine']['cpus']} CPUs "
        f"(load average {report['machine']['load_average'][0]:.1f})",
    ]
    m = report.get("monitor")
    if m:
        lines.insert(
            -1,
            f"action deviation vs the full-precision reference {m['reference']} (monitor node): "
            f"cumulative (Eq. 5) {_fmt(m['mean_cumulative_deviation'])} per episode on average over "
            f"{m['episodes_with_deviation']} episode(s); {m['chunks_compared']} chunks compared, "
            f"{m['skipped_total']} skipped while the reference was busy, {m['unmatched_total']} without "
            f"their frames; reference p50 {_fmt(m['reference_latency_p50_ms'], '.0f')} ms",
        )
    js, txt = run_dir / "report.json", run_dir / "report.txt"
    js.write_text(json.dumps(report, indent=2))
    txt.write_text("\n".join(lines) + "\n")
    return js, txt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m qvla_ros.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        help=f"policy directory or qvla_quant artifact (default: {DEFAULT_POLICY}, relative to the working directory)",
    )
    ap.add_argument("--episodes", type=int, default=5, help="number of episodes (default 5)")
    ap.add_argument("--episode-seconds", type=float, default=15.0, help="time limit per episode (default 15 s)")
    ap.add_argument("--full-episodes", action="store_true", help="run every episode to its time limit")
    ap.add_argument(
        "--random-policy",
        action="store_true",
        help="no checkpoint: use a freshly made random-weight π0 (its success rate is meaningless)",
    )
    ap.add_argument("--device", default="cpu", help="torch device for inference (cpu, cuda, cuda:N)")
    ap.add_argument(
        "--monitor",
        action="store_true",
        default=os.environ.get("QVLA_DEMO_MONITOR", "").lower() in ("1", "true", "yes", "on"),
        help="also run the monitor node (full-precision reference -> ActionDeviation); the report gives "
        "each episode's cumulative action deviation (also: QVLA_DEMO_MONITOR=1 make demo)",
    )
    ap.add_argument(
        "--reference",
        default=None,
        help=f"--monitor: the full-precision reference (default: the artifact's source policy, else "
        f"{DEFAULT_REFERENCE}; with --random-policy the random policy itself)",
    )
    ap.add_argument("--sim-backend", default="mujoco", choices=("mujoco", "kinematic"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the random policy (with --random-policy)")
    ap.add_argument(
        "--domain-id",
        type=int,
        default=None,
        help="ROS_DOMAIN_ID (default: one derived from the process id, so demos do not see each other)",
    )
    ap.add_argument("--run-dir", default=None, help="where the report goes (default ./runs/demo-<time>)")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    if args.episodes < 1 or args.episode_seconds <= 0:
        ap.error("--episodes must be >= 1 and --episode-seconds > 0")
    if args.domain_id is None:
        args.domain_id = 100 + os.getpid() % 100
    args.run_dir = args.run_dir or str(Path.cwd() / "runs" / time.strftime("demo-%Y%m%d-%H%M%S"))
    try:
        _check_ros()
        report = run(args)
    except DemoError as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the nodes were stopped", file=sys.stderr)
        return 130
    js, txt = write_report(report, Path(args.run_dir))
    print("\n" + txt.read_text() + f"report: {txt} (and {js.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
