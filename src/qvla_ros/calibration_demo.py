"""`make calibration-demo`: the calibration loop on the user's own robot, in simulation, through real DDS.

    python -m qvla_ros.calibration_demo                 # 3 demonstrations, 4-bit budget, 2 closed-loop episodes
    python -m qvla_ros.calibration_demo --episodes 5 --budget 3 --closed-loop 5
    python -m qvla_ros.calibration_demo --sim-backend kinematic --random-policy   # seconds, no MuJoCo (no success)

Stages, each a separate set of ROS processes started by qvla_ros.bringup, each timed:
  1. record      `--launch record`: the sim rig's scripted teleoperator publishes the leader-arm commands, the rig
                 follows them, the recorder node writes one episode per demonstration (rosbag2 + MCAP)
  2. bring-up    the policy node drives the rig with the committed W4 artifact; the calibration node beside it
  3. calibrate   a Calibrate goal on the new recordings (budget, held-out validation episode) with reload: the
                 action's feedback is shown live; the policy node hot-reloads the new artifact, its 30 Hz stream
                 going on (the longest gap between two commands is measured)
  4. closed loop episodes driven by the new artifact (its id checked on the policy node's QuantizationStatus)
The report (JSON + text) and the new artifact (with its calibration report and plots) go to
runs/calibration-demo-<time>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

DEFAULT_RUNNING = "models/sim_transfer_cube_w4"  # what the policy node runs before the reload
DEFAULT_FP = "models/sim_transfer_cube_fp"  # what is calibrated


class DemoError(RuntimeError):
    """Something the user can fix; the message says what."""


def _path(p: str) -> Path:
    q = Path(p).expanduser()
    if not q.exists():
        raise DemoError(
            f"{p} not found (run from the repository root, or pass --policy/--running); "
            "--random-policy runs the loop on a random π0 instead"
        )
    return q.resolve()


class Watch:
    """The demo's ROS node: the recorder's status, the policy node's commands and quantization status, the action."""

    def __init__(self):
        import rclpy
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Bool, String

        from qvla_msgs.action import Calibrate
        from qvla_msgs.msg import QuantizationStatus
        from qvla_msgs.srv import EpisodeControl

        self.Calibrate, self.EpisodeControl = Calibrate, EpisodeControl
        self.node = rclpy.create_node("qvla_calibration_demo")
        rel = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.recorder: dict = {}
        self.commands: list[float] = []
        self.success = False
        self.quant: dict = {}
        self.rejections: list[str] = []
        self.node.create_subscription(String, "/qvla/recorder/status", lambda m: self._set_rec(m.data), rel)
        self.node.create_subscription(
            JointState, "/qvla/master_arm_left/joint_states", lambda m: self.commands.append(time.monotonic()), rel
        )
        self.node.create_subscription(
            Bool, "/qvla/episode/success", lambda m: setattr(self, "success", m.data), latched
        )
        self.node.create_subscription(
            QuantizationStatus,
            "/qvla/policy_node/quantization_status",
            lambda m: setattr(self, "quant", {"artifact_id": m.artifact_id, "average_bits": m.average_bits}),
            latched,
        )
        self.node.create_subscription(
            String, "/qvla/calibration/goal_rejections", lambda m: self.rejections.append(m.data), latched
        )
        self.action = ActionClient(self.node, Calibrate, "/qvla/calibration/calibrate")
        self.sim_episode = self.node.create_client(EpisodeControl, "/qvla/sim/episode")
        self.policy_episode = self.node.create_client(EpisodeControl, "/qvla/policy_node/episode")
        self.ex = SingleThreadedExecutor()
        self.ex.add_node(self.node)
        threading.Thread(target=self.ex.spin, daemon=True).start()

    def _set_rec(self, data: str) -> None:
        self.recorder = json.loads(data)

    def wait(self, fut, timeout: float, what: str):
        end = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < end:
            time.sleep(0.01)
        if not fut.done():
            raise DemoError(f"{what}: no answer within {timeout:.0f} s (see nodes.log)")
        return fut.result()

    def call(self, client, command: int, timeout: float = 60.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise DemoError(f"service {client.srv_name} did not appear within {timeout:.0f} s (see nodes.log)")
        res = self.wait(client.call_async(self.EpisodeControl.Request(command=command)), timeout, client.srv_name)
        if not res.success:
            raise DemoError(f"{client.srv_name}: {res.message}")
        return res

    def rate(self, window: float = 2.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.commands[-200:] if now - t <= window]
        return (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 else 0.0

    def max_gap(self, t0: float, t1: float) -> float:
        ts = [t for t in self.commands if t0 <= t <= t1]
        return max((b - a for a, b in zip(ts, ts[1:])), default=float("nan"))

    def close(self):
        self.ex.shutdown()
        self.node.destroy_node()


_LAST = {"t": 0.0, "key": None}


def _live(text: str, key=None) -> None:
    """A status line: rewritten in place on a terminal; otherwise printed every 3 s (or when `key` changes)."""
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K" + text)
    elif time.monotonic() - _LAST["t"] >= 3.0 or key != _LAST["key"]:
        sys.stdout.write(text + "\n")
        _LAST.update(t=time.monotonic(), key=key)
    else:
        return
    sys.stdout.flush()


def _done(text: str) -> None:
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K")
    print(text, flush=True)


def _short(topic: str) -> str:
    parts = topic.strip("/").split("/")
    return parts[0] if "camera" in topic else parts[-2]


def _check_alive(runner, log_path: Path, what: str) -> None:
    gone = {n: rc for n, rc in runner.exited().items()}
    if gone:
        raise DemoError(f"{what}: node(s) exited {gone}; last output:\n{log_path.read_text()[-3000:]}")


def run(args) -> dict:
    from qvla_ros.bringup import Bringup, node_set
    from qvla_ros.dds import local_dds_environment

    run_dir = Path(args.run_dir).resolve()
    if args.random_policy:
        from qvla_ros.policy.tiny import make_tiny_policy

        run_dir.mkdir(parents=True, exist_ok=True)
        fp = running = make_tiny_policy(run_dir / "random_policy", seed=0)
        print(
            "NOTE: --random-policy: a RANDOM-WEIGHT π0; the loop is real, its success rate is meaningless", flush=True
        )
    else:
        fp, running = _path(args.policy), _path(args.running)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(local_dds_environment(args.domain_id))
    import rclpy

    log_path = run_dir / "nodes.log"
    log = open(log_path, "w")
    dataset = run_dir / "demos"
    artifact = run_dir / f"{fp.name}_w{args.budget:g}"
    times: dict[str, float] = {}
    report: dict = {"run_dir": str(run_dir), "policy": str(fp), "running_before": str(running), "budget": args.budget}
    rclpy.init()
    watch = Watch()
    runners = []
    try:
        # ---- 1. record through the ROS graph
        t0 = time.monotonic()
        specs, _ = node_set(
            {
                "sim": "true",
                "sim_backend": args.sim_backend,
                "dataset": str(dataset),
                "episodes": str(args.episodes),
                "episode_time": str(args.episode_time),
                "reset_time": str(args.reset_time),
            },
            launch="record",
        )
        print(
            f"[1/4] recording {args.episodes} demonstrations of the scripted teleoperator into {dataset} "
            f"(sim rig + recorder node; output: {log_path})",
            flush=True,
        )
        runner = Bringup(specs, domain_id=args.domain_id, output=log).start()
        runners.append(runner)
        limit = time.monotonic() + args.episodes * (args.episode_time + args.reset_time + 30) + 60
        while "recorder" not in runner.exited():
            if runner.exited() or time.monotonic() > limit:
                runner.stop()
                raise DemoError(
                    f"recording did not finish ({runner.exited() or 'timeout'}); last output:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            s = watch.recorder
            if s.get("state") == "recording":
                rates = " ".join(
                    f"{_short(t)} {v['rate_hz']:.0f}"
                    for t, v in s.get("topics", {}).items()
                    if "camera" in t or "master" in t
                )
                _live(
                    f"      episode {s['episode'] + 1}/{args.episodes} {s['duration_s']:5.1f} s | {rates} Hz | "
                    f"drops {s['dropped']} | {s['file_bytes'] / 1e6:.1f} MB"
                )
            elif s:
                _live(f"      {s.get('state')} | kept {s.get('kept')}")
            time.sleep(0.25)
        rc = runner.exited()["recorder"]
        runner.stop()
        if rc != 0:
            raise DemoError(f"the recorder exited with code {rc}; see {log_path}")
        episodes = sorted(dataset.glob("episode_*"))
        times["record"] = time.monotonic() - t0
        recorded = [json.loads(line) for line in (dataset / "episodes.jsonl").read_text().splitlines()]
        kept = [e for e in recorded if e["event"] == "kept"]
        _done(
            f"      {len(episodes)} episodes, {sum(e['file_bytes'] for e in kept) / 1e6:.1f} MB, "
            f"{sum(e['dropped'] for e in kept)} dropped, teleop success {sum(bool(e['success']) for e in kept)}/"
            f"{len(kept)}  [{times['record']:.1f} s]"
        )
        report["recording"] = {"episodes": [str(e) for e in episodes], "kept": kept}

        # ---- 2. the policy node on the rig, the calibration node beside it
        t0 = time.monotonic()
        specs, _ = node_set({"sim": "true", "sim_backend": args.sim_backend, "policy": str(running)})
        cal, _ = node_set({"policy": str(fp)}, launch="calibrate")
        cal = [
            dataclasses.replace(
                s,
                parameters={
                    **s.parameters,
                    **{
                        "calibration.exact_fraction": args.exact_fraction,
                        "calibration.rank_sample": args.rank_sample,
                        "calibration.torch_threads": 1,
                    },
                },
            )
            for s in cal
        ]
        print(f"[2/4] starting the sim rig, the policy node ({running.name}) and the calibration node", flush=True)
        runner = Bringup(specs + cal, domain_id=args.domain_id, output=log).start()
        runners.append(runner)
        end = time.monotonic() + 180
        while not (watch.rate() > 20 and watch.quant):
            _check_alive(runner, log_path, "bring-up")
            if time.monotonic() > end:
                raise DemoError(f"the policy node did not stream commands within 180 s; see {log_path}")
            time.sleep(0.2)
        if not watch.action.wait_for_server(timeout_sec=60.0):
            raise DemoError("the calibration node's action did not appear within 60 s")
        times["bring-up"] = time.monotonic() - t0
        before = dict(watch.quant)
        name = Path(before["artifact_id"]).name or before["artifact_id"]
        _done(f"      streaming at {watch.rate():.1f} Hz with {name}  [{times['bring-up']:.1f} s]")

        # ---- 3. calibrate through the action, reload
        t0 = time.monotonic()
        print(
            f"[3/4] Calibrate goal: {len(episodes)} recordings, budget {args.budget:g} bits/weight, "
            f"{args.solver}, 1 held-out validation episode, reload -> {artifact}",
            flush=True,
        )
        C = watch.Calibrate
        goal = C.Goal(
            recordings=[str(dataset)],
            budget=args.budget,
            output_path=str(artifact),
            solver=args.solver,
            samples_per_episode=args.samples_per_episode,
            validation_episodes=1,
            validation_samples_per_episode=args.validation_samples,
            reload=True,
        )
        stage_t: dict[str, float] = {}

        def on_feedback(msg):
            f = msg.feedback
            stage_t.setdefault(f.stage, time.monotonic())
            eta = f"{f.eta_s:4.0f} s left" if f.eta_s >= 0 else "   ? s left"
            _live(
                f"      {f.stage:<10} {100 * f.progress:5.1f}% | {eta} | {f.detail[:60]} | cmd {watch.rate():4.1f} Hz",
                key=f.stage,
            )

        handle = watch.wait(watch.action.send_goal_async(goal, feedback_callback=on_feedback), 120, "goal")
        if not handle.accepted:
            time.sleep(0.5)
            raise DemoError(f"goal rejected: {watch.rejections[-1] if watch.rejections else '(no reason published)'}")
        res = watch.wait(handle.get_result_async(), args.calibration_timeout, "calibration")
        t_done = time.monotonic()
        r = res.result
        if res.status != 4:  # SUCCEEDED
            raise DemoError(f"calibration ended with status {res.status}: {r.summary}")
        times["calibrate+reload"] = t_done - t0
        stages = sorted(stage_t.items(), key=lambda kv: kv[1])
        stage_s = {s: (stages[i + 1][1] if i + 1 < len(stages) else t_done) - t for i, (s, t) in enumerate(stages)}
        _done(
            f"      {r.artifact_path}: {r.average_bits:.3f} bits/weight ({r.average_bits_with_overhead:.3f} with "
            f"scale/zero), pruned {100 * r.pruned_fraction:.1f}%  [{times['calibrate+reload']:.1f} s]"
        )
        print("      stages: " + ", ".join(f"{s} {v:.1f} s" for s, v in stage_s.items()), flush=True)
        print("      " + r.validation, flush=True)
        for s in r.skipped:
            print(f"      skipped {s}", flush=True)
        gap = watch.max_gap(stage_t.get("reloading", t0), time.monotonic())
        print(
            f"      reload: {'ok' if r.reloaded else 'FAILED'}: {r.reload_message}; longest gap between commands "
            f"at this process {1e3 * gap:.0f} ms while the policy was swapped",
            flush=True,
        )
        report["calibration"] = {
            "artifact": r.artifact_path,
            "average_bits": r.average_bits,
            "average_bits_with_overhead": r.average_bits_with_overhead,
            "pruned_fraction": r.pruned_fraction,
            "validation": r.validation,
            "action_mse": r.action_mse,
            "report_path": r.report_path,
            "skipped": list(r.skipped),
            "reloaded": r.reloaded,
            "reload_message": r.reload_message,
            "stage_seconds": stage_s,
            "max_command_gap_during_reload_ms": 1e3 * gap,
        }
        if not r.reloaded:
            raise DemoError(f"the policy node did not load the new artifact: {r.reload_message}")

        # ---- 4. closed loop with the new artifact
        t0 = time.monotonic()
        end = time.monotonic() + 30
        while Path(watch.quant.get("artifact_id", "")).resolve() != artifact.resolve() and time.monotonic() < end:
            time.sleep(0.1)
        running_now = watch.quant.get("artifact_id", "")
        print(f"[4/4] {args.closed_loop} closed-loop episodes with {running_now}", flush=True)
        results = []
        for k in range(args.closed_loop):
            watch.call(watch.policy_episode, watch.EpisodeControl.Request.STOP)
            watch.call(watch.sim_episode, watch.EpisodeControl.Request.START)
            watch.success = False
            watch.call(watch.policy_episode, watch.EpisodeControl.Request.START)
            t_ep = time.monotonic()
            while time.monotonic() - t_ep < args.episode_seconds and not watch.success:
                _check_alive(runner, log_path, "closed loop")
                _live(
                    f"      episode {k + 1}/{args.closed_loop} {time.monotonic() - t_ep:4.1f} s | cmd "
                    f"{watch.rate():4.1f} Hz"
                )
                time.sleep(0.1)
            out = json.loads(watch.call(watch.sim_episode, watch.EpisodeControl.Request.STOP).message)
            results.append(out)
            _done(
                f"      episode {k + 1}: {'SUCCESS' if out['succeeded'] else 'no success'} (seed {out['seed']}, "
                f"sim {out['sim_time']:.1f} s)"
            )
        times["closed-loop"] = time.monotonic() - t0
        report["closed_loop"] = {
            "artifact": running_now,
            "episodes": results,
            "successes": sum(e["succeeded"] for e in results),
        }
        runner.stop()
    finally:
        for r in runners:
            r.stop()
        watch.close()
        rclpy.try_shutdown()
        log.close()
    report["stage_seconds"] = times
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["stage          seconds"] + [f"{k:<14} {v:7.1f}" for k, v in times.items()]
    lines.append(f"{'total':<14} {sum(times.values()):7.1f}")
    (run_dir / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(
        f"closed loop with the new artifact: {report['closed_loop']['successes']}/{args.closed_loop} successful; "
        f"report: {run_dir / 'report.json'}"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qvla-calibration-demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--episodes", type=int, default=3, help="demonstrations to record (one is held out for validation)")
    p.add_argument("--episode-time", type=float, default=8.5, help="seconds per demonstration")
    p.add_argument("--reset-time", type=float, default=1.0)
    p.add_argument("--budget", type=float, default=4.0)
    p.add_argument("--solver", default="greedy", choices=("greedy", "lagrangian"))
    p.add_argument("--samples-per-episode", type=int, default=2)
    p.add_argument("--validation-samples", type=int, default=8)
    p.add_argument("--exact-fraction", type=float, default=0.002, help="share refined by exact passes (small: fast)")
    p.add_argument(
        "--rank-sample",
        type=int,
        default=0,
        help="random channels measured exactly for the proxy's rank correlation (0: none, fast)",
    )
    p.add_argument("--closed-loop", type=int, default=2, help="closed-loop episodes with the new artifact")
    p.add_argument("--episode-seconds", type=float, default=12.0)
    p.add_argument("--policy", default=DEFAULT_FP, help="full-precision policy to calibrate")
    p.add_argument("--running", default=DEFAULT_RUNNING, help="what the policy node runs before the reload")
    p.add_argument("--random-policy", action="store_true", help="a random π0 for both (no checkpoint needed)")
    p.add_argument("--sim-backend", default="mujoco", choices=("mujoco", "kinematic"))
    p.add_argument("--calibration-timeout", type=float, default=1800.0)
    p.add_argument("--domain-id", type=int, default=None)
    p.add_argument("--run-dir", default=f"runs/calibration-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    args = p.parse_args(argv)
    if args.domain_id is None:
        args.domain_id = 100 + os.getpid() % 100  # never the default domain other ROS users on the machine share
    if args.episodes < 2:
        print("qvla-calibration-demo: error: --episodes must be >= 2 (one is held out for validation)", file=sys.stderr)
        return 2
    try:
        run(args)
    except DemoError as e:
        print(f"\nqvla-calibration-demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nqvla-calibration-demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
