"""A ROS 2 probe the calibration tests (and `make calibration-demo`) start as a separate process: an action client of
the calibration node's Calibrate action that records every feedback message, optionally cancels at a stage, and
optionally watches the policy node's command stream while the job runs and the artifact is hot-reloaded. One JSON
line out.

    python calibration_probe.py --recordings DIR --budget 4 --out OUT [--reload] [--cancel-at exact] [--watch]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from qvla_msgs.action import Calibrate

ACTION = "/qvla/calibration/calibrate"
STATUS = {1: "accepted", 2: "executing", 3: "canceling", 4: "succeeded", 5: "canceled", 6: "aborted"}
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class Probe(Node):
    def __init__(self, watch: bool):
        super().__init__("calibration_probe")
        self.client = ActionClient(self, Calibrate, ACTION)
        self.rejections: list[str] = []
        self.create_subscription(
            String, "/qvla/calibration/goal_rejections", lambda m: self.rejections.append(m.data), LATCHED
        )
        self.commands: list[tuple[float, float]] = []  # (receipt, header stamp) of the left arm's commands
        self.chunks: list[tuple[float, str]] = []
        if watch:
            from sensor_msgs.msg import JointState

            from qvla_msgs.msg import ActionChunk

            self.create_subscription(
                JointState,
                "/qvla/master_arm_left/joint_states",
                lambda m: self.commands.append((time.monotonic(), m.header.stamp.sec + m.header.stamp.nanosec * 1e-9)),
                RELIABLE,
            )
            self.create_subscription(
                ActionChunk,
                "/qvla/policy_node/action_chunk",
                lambda m: self.chunks.append((time.monotonic(), m.model_id)),
                RELIABLE,
            )

    def spin_until(self, ex, cond, timeout):
        end = time.monotonic() + timeout
        while not cond() and time.monotonic() < end:
            ex.spin_once(timeout_sec=0.01)
        return cond()


def gaps(samples, t0, t1) -> dict:
    recv = [r for r, _ in samples if t0 <= r <= t1]
    stamps = [s for r, s in samples if t0 <= r <= t1 and s > 0]
    d = [b - a for a, b in zip(recv, recv[1:])]
    n = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "count": len(recv),
        "max_gap_ms": 1e3 * max(d) if d else None,
        "node_gap_max_ms": 1e3 * max(n) if n else None,
        "rate_hz": (len(recv) - 1) / (recv[-1] - recv[0]) if len(recv) > 1 else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recordings", nargs="+", required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--policy", default="")
    ap.add_argument("--bits", default="")
    ap.add_argument("--solver", default="")
    ap.add_argument("--samples-per-episode", type=int, default=0)
    ap.add_argument("--validation-samples-per-episode", type=int, default=0)
    ap.add_argument("--reload", action="store_true")
    ap.add_argument("--cancel-at", default="", help="cancel at the first feedback of this stage")
    ap.add_argument("--watch", action="store_true", help="watch the policy node's commands and chunks")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    rclpy.init()
    out: dict = {}
    try:
        probe = Probe(args.watch)
        ex = SingleThreadedExecutor()
        ex.add_node(probe)
        if not probe.client.wait_for_server(timeout_sec=60.0):
            raise RuntimeError(f"action server {ACTION} not available")
        if args.watch and not probe.spin_until(ex, lambda: len(probe.chunks) > 2 and len(probe.commands) > 30, 90):
            raise RuntimeError("the policy node is not streaming (no chunks/commands)")
        goal = Calibrate.Goal(
            recordings=args.recordings,
            budget=args.budget,
            output_path=args.out,
            policy_path=args.policy,
            solver=args.solver,
            bit_set=[int(b) for b in args.bits.split(",")] if args.bits else [],
            samples_per_episode=args.samples_per_episode,
            validation_samples_per_episode=args.validation_samples_per_episode,
            reload=args.reload,
        )
        feedback = []

        def on_feedback(msg):
            f = msg.feedback
            feedback.append(
                {
                    "t": time.monotonic(),
                    "stage": f.stage,
                    "progress": round(float(f.progress), 4),
                    "stage_progress": round(float(f.stage_progress), 4),
                    "eta_s": f.eta_s,
                    "detail": f.detail,
                }
            )

        t_goal = time.monotonic()
        models_before = sorted({m for _, m in probe.chunks})
        send = probe.client.send_goal_async(goal, feedback_callback=on_feedback)
        probe.spin_until(ex, send.done, 120.0)
        handle = send.result()
        out["accepted"] = bool(handle.accepted)
        if not handle.accepted:
            probe.spin_until(ex, lambda: probe.rejections, 5.0)
            out["rejection"] = probe.rejections[-1] if probe.rejections else ""
            out["seconds_to_answer"] = time.monotonic() - t_goal
        else:
            cancelled = False
            res_future = handle.get_result_async()
            end = time.monotonic() + args.timeout
            while not res_future.done() and time.monotonic() < end:
                ex.spin_once(timeout_sec=0.01)
                if args.cancel_at and not cancelled and any(f["stage"] == args.cancel_at for f in feedback):
                    probe.spin_until(ex, handle.cancel_goal_async().done, 30.0)
                    cancelled = True
                    out["cancel_sent_at_stage"] = args.cancel_at
            t_done = time.monotonic()
            if not res_future.done():
                raise RuntimeError(f"no result within {args.timeout} s; feedback so far: {feedback[-3:]}")
            res = res_future.result()
            r = res.result
            out["status"] = STATUS.get(res.status, str(res.status))
            out["result"] = {
                k: getattr(r, k)
                for k in (
                    "artifact_path",
                    "average_bits",
                    "average_bits_with_overhead",
                    "pruned_fraction",
                    "summary",
                    "validation",
                    "action_mse",
                    "report_path",
                    "reloaded",
                    "reload_message",
                )
            }
            out["result"]["skipped"] = list(r.skipped)
            out["seconds"] = t_done - t_goal
            if args.watch:
                probe.spin_until(ex, lambda: False, 3.0)  # the stream after the reload
                t_reload = next((f["t"] for f in feedback if f["stage"] == "reloading"), t_done)
                out["commands"] = gaps(probe.commands, t_goal, time.monotonic())
                out["commands_during_job"] = gaps(probe.commands, t_goal, t_reload)
                out["commands_during_reload"] = gaps(probe.commands, t_reload - 0.1, time.monotonic())
                out["models_before"] = models_before
                out["models_after"] = sorted({m for t, m in probe.chunks if t > t_done + 1.0})
        out["feedback"] = [{**f, "t": round(f["t"] - t_goal, 3)} for f in feedback]
    finally:
        rclpy.try_shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
