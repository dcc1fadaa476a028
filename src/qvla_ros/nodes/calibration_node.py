"""The calibration node: the Calibrate action, recordings -> a validated QVLA artifact -> (optionally) hot-reloaded
into the running policy node.

    action      ~/calibrate (qvla_msgs/Calibrate)
                goal: recordings (episode or dataset directories), budget, bit set, solver, sample counts, output
                directory, policy (zero / empty fields: the calibration.* parameters), reload
                feedback: stage (reading, sampling, proxy, exact, allocating, packing, validating, reloading),
                progress of the whole job, progress within the stage, estimated seconds left
                cancel: the job stops at its next step; the output directory stays resumable: the same goal (same
                output_path) continues where it stopped
                result: artifact path, average bits (also with the per-row scale/zero), pruned fraction, the table per
                role, the validation against full precision on held-out episodes, the report's path, skipped
                recordings with their reasons, whether the policy node now runs it
    publishes   ~/goal_rejections (std_msgs/String, latched): why the last goal was rejected (an action's goal
                response carries no reason), e.g. a budget below the reachable range, which it names
    calls       calibration.reload_service (qvla_msgs/ReloadPolicy) for goals with reload: the policy node swaps the
                policy without a gap in its 30 Hz command stream, and keeps the old one when the reload fails

The job itself (qvla_ros.policy.calibration_job) runs in a child process, niced, so that its CPU load and memory never
touch this node, and a cancel is a signal: one goal at a time. Goals are checked when they arrive (paths, bit set,
solver, budget against the range the policy and bit set can reach) and rejected with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String

from qvla_msgs.action import Calibrate
from qvla_msgs.srv import ReloadPolicy
from qvla_ros.control.params import CALIBRATION_NODE, ParameterError
from qvla_ros.nodes import declare_schema, qos, run_node
from qvla_ros.policy.calibration_job import EXIT_CANCELLED, EXIT_OK, EXIT_VALIDATION, JobError, JobSpec, check_budget

NODE_NAME = "calibration"


class CalibrationNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = declare_schema(self, CALIBRATION_NODE, CALIBRATION_NODE.defaults())
        c = self.cfg
        if c["calibration.policy"] and not Path(c["calibration.policy"]).is_dir():
            raise ParameterError(
                f"parameter calibration.policy: {c['calibration.policy']} does not exist (the "
                "full-precision policy directory to calibrate; '' = goals name it)"
            )
        self.group = ReentrantCallbackGroup()
        self.busy = threading.Lock()
        self.child: subprocess.Popen | None = None
        self._ranges: dict[tuple, tuple[float, float]] = {}
        self.rejections = self.create_publisher(String, "~/goal_rejections", qos("transient_local"))
        self.reload_client = self.create_client(
            ReloadPolicy, c["calibration.reload_service"], callback_group=self.group
        )
        self.server = ActionServer(
            self,
            Calibrate,
            "~/calibrate",
            execute_callback=self._execute,
            goal_callback=self._on_goal,
            cancel_callback=lambda goal: CancelResponse.ACCEPT,
            callback_group=self.group,
        )
        self.get_logger().info(
            f"Calibrate action on {self.resolve_topic_name('~/calibrate')} (default policy: "
            f"{c['calibration.policy'] or 'none: goals name it'}; reload via "
            f"{c['calibration.reload_service']})"
        )

    # ---------------------------------------------------------------- goals
    def spec_of(self, goal) -> JobSpec:
        """The job a goal asks for, with the node's defaults where the goal leaves a field at zero / empty."""
        c = self.cfg
        policy = goal.policy_path or c["calibration.policy"]
        bits = tuple(int(b) for b in goal.bit_set) or tuple(int(b) for b in c["calibration.bits"].split(","))
        out = goal.output_path
        if not out and policy:
            root = Path(c["calibration.output_dir"]) if c["calibration.output_dir"] else Path(policy).parent
            out = str(root / f"{Path(policy).name}_calib_{goal.budget:g}b_{time.strftime('%Y%m%d-%H%M%S')}")
        return JobSpec(
            policy=policy,
            recordings=list(goal.recordings),
            out=out,
            budget=float(goal.budget),
            bits=bits,
            solver=goal.solver or c["calibration.solver"],
            samples_per_episode=goal.samples_per_episode or c["calibration.samples_per_episode"],
            max_episodes=goal.max_episodes or c["calibration.max_episodes"],
            validation_episodes=goal.validation_episodes or c["calibration.validation_episodes"],
            validation_samples_per_episode=(
                goal.validation_samples_per_episode or c["calibration.validation_samples_per_episode"]
            ),
            exact_fraction=c["calibration.exact_fraction"],
            rank_sample=c["calibration.rank_sample"],
            seed=c["calibration.seed"],
            skip_failed=c["calibration.skip_failed"],
            max_action_mse=c["calibration.max_action_mse"],
        )

    def _on_goal(self, goal) -> GoalResponse:
        try:
            if self.busy.locked():
                raise JobError("a calibration is running already (one at a time): wait for it or cancel it")
            spec = self.spec_of(goal)
            spec.check()
            missing = [r for r in spec.recordings if not Path(r).exists()]
            if len(missing) == len(spec.recordings):
                raise JobError(f"none of the recordings exists: {', '.join(missing)}")
            key = (str(Path(spec.policy).resolve()), spec.bits, spec.max_pruned_fraction)
            if key not in self._ranges:
                self._ranges[key] = check_budget(JobSpec(**{**spec.to_dict(), "budget": 16.0}))
            lo, hi = self._ranges[key]
            if spec.budget < lo - 1e-9:
                raise JobError(
                    f"budget {spec.budget:g} bits/weight cannot be met for {spec.policy} with bits "
                    f"{list(spec.bits)}: the reachable range is {lo:.3f} .. {hi:.3f} bits/weight; raise the "
                    "budget or add lower bit-widths"
                )
        except (JobError, ValueError, OSError) as e:
            reason = " ".join(str(e).split())
            self.get_logger().error(f"goal rejected: {reason}")
            self.rejections.publish(String(data=reason))
            return GoalResponse.REJECT
        self.get_logger().info(
            f"goal accepted: {spec.budget:g} bits/weight for {spec.policy}, "
            f"{len(spec.recordings)} recording path(s) -> {spec.out}"
        )
        return GoalResponse.ACCEPT

    # ---------------------------------------------------------------- the job
    def _execute(self, goal_handle):
        goal = goal_handle.request
        result = Calibrate.Result()
        if not self.busy.acquire(blocking=False):
            goal_handle.abort()
            result.summary = "a calibration is running already"
            return result
        try:
            return self._run(goal_handle, goal, result)
        finally:
            self.busy.release()

    def _feedback(self, goal_handle, stage, progress, detail="", stage_progress=0.0, eta=-1.0) -> None:
        goal_handle.publish_feedback(
            Calibrate.Feedback(
                stage=stage,
                progress=float(progress),
                detail=detail,
                stage_progress=float(stage_progress),
                eta_s=float(eta),
            )
        )

    def _run(self, goal_handle, goal, result):
        spec = self.spec_of(goal)
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="qvla_calibration_", delete=False) as f:
            json.dump(spec.to_dict(), f)
            spec_file = f.name
        c = self.cfg
        cmd = [sys.executable, "-m", "qvla_ros.policy.calibration_job", "--spec", spec_file]
        if c["calibration.torch_threads"]:
            cmd += ["--threads", str(c["calibration.torch_threads"])]
        env = dict(os.environ)
        if c["calibration.torch_threads"]:
            env["OMP_NUM_THREADS"] = str(c["calibration.torch_threads"])
        nice = c["calibration.nice"]
        log_path = Path(tempfile.gettempdir()) / f"qvla_calibration_{os.getpid()}.log"
        log = open(log_path, "w")
        self.child = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(self.child.stdout, lines), daemon=True).start()
        outcome, error, started = None, "", {}
        cancel_sent = 0.0
        self.get_logger().info(f"calibration job started (pid {self.child.pid}, log {log_path}): {spec.out}")
        while True:
            if goal_handle.is_cancel_requested and not cancel_sent and self.child.poll() is None:
                self.get_logger().info("cancel requested: stopping the job (its output stays resumable)")
                os.killpg(self.child.pid, signal.SIGTERM)
                cancel_sent = time.monotonic()
            if cancel_sent and time.monotonic() - cancel_sent > 30 and self.child.poll() is None:
                os.killpg(self.child.pid, signal.SIGKILL)  # the store is written atomically: still resumable
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if self.child.poll() is not None and lines.empty():
                    break
                continue
            if line is None:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = event.get("event")
            if kind == "progress":
                self._feedback(
                    goal_handle,
                    event["stage"],
                    event["progress"],
                    event.get("detail", ""),
                    event.get("stage_progress", 0.0),
                    event.get("eta_s", -1.0),
                )
            elif kind == "started":
                started = event
                if event.get("resumed"):
                    self.get_logger().info(f"resuming {spec.out} (done before: {event['stages_done_before']})")
            elif kind == "skipped":
                self.get_logger().warning(f"skipped {event['path']}: {event['reason']}")
            elif kind == "result":
                outcome = event["result"]
            elif kind == "error":
                error = event["message"]
        rc = self.child.wait()
        self.child = None
        log.close()
        try:
            os.unlink(spec_file)
        except OSError:
            pass
        result.artifact_path = spec.out
        if rc == EXIT_CANCELLED or (cancel_sent and rc != EXIT_OK):
            result.summary = (
                f"cancelled; {spec.out} is resumable: send the same goal again with output_path {spec.out!r}"
            )
            self.get_logger().info(result.summary)
            goal_handle.canceled()
            return result
        if outcome is None:
            tail = error or _tail(log_path)
            result.summary = f"calibration failed: {tail}"
            self.get_logger().error(result.summary)
            goal_handle.abort()
            return result
        self._fill(result, outcome)
        if started.get("resumed"):
            result.summary += f"\n(resumed an interrupted run; done before: {started.get('stages_done_before')})"
        if goal.reload:
            if rc == EXIT_VALIDATION or not outcome["passed"]:
                result.reload_message = (
                    f"not handed over: validation failed (action MSE {outcome['action_mse']:.3g} "
                    f"> calibration.max_action_mse {c['calibration.max_action_mse']:g})"
                )
            else:
                self._feedback(goal_handle, "reloading", 1.0, c["calibration.reload_service"], 0.0, 0.0)
                result.reloaded, result.reload_message = self._reload(spec.out)
                self._feedback(goal_handle, "reloading", 1.0, result.reload_message, 1.0, 0.0)
            (self.get_logger().info if result.reloaded else self.get_logger().warning)(result.reload_message)
        goal_handle.succeed()
        self.get_logger().info(
            f"calibration done: {result.artifact_path}, {result.average_bits:.3f} bits/weight, "
            f"validation MSE {result.action_mse:.3g}"
        )
        return result

    @staticmethod
    def _fill(result, r: dict) -> None:
        result.artifact_path = r["artifact_path"]
        result.average_bits = float(r["average_bits"])
        result.average_bits_with_overhead = float(r["average_bits_with_overhead"])
        result.pruned_fraction = float(r["pruned_fraction"])
        result.summary = r["summary"]
        result.validation = r["validation_text"]
        result.action_mse = float(r["action_mse"])
        result.report_path = r["report_path"]
        result.skipped = list(r["skipped"])

    def _reload(self, path: str) -> tuple[bool, str]:
        c = self.cfg
        if not self.reload_client.wait_for_service(timeout_sec=5.0):
            return False, f"not reloaded: the policy node's {c['calibration.reload_service']} is not available"
        done = threading.Event()
        fut = self.reload_client.call_async(ReloadPolicy.Request(artifact_path=path))
        fut.add_done_callback(lambda f: done.set())
        if not done.wait(c["calibration.reload_timeout"]):
            return False, f"not reloaded: no answer within {c['calibration.reload_timeout']:g} s"
        res = fut.result()
        return bool(res.success), res.message

    def shutdown(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)  # resumable: the next goal continues it
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        text = path.read_text()
    except OSError:
        return "the job ended without a result"
    return " ".join(text[-n:].split()) or "the job ended without a result"


def main(argv: list[str] | None = None) -> int:
    # four threads: the job's, goals, cancels, the reload answer
    return run_node(
        NODE_NAME, CalibrationNode, (ParameterError,), lambda: MultiThreadedExecutor(num_threads=4), argv=argv
    )


if __name__ == "__main__":
    sys.exit(main())
