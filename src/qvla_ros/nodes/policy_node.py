"""The policy node: three cameras + two arm states + an instruction -> a QVLA-quantized policy (π0) -> 30 Hz commands
for two arms.

    subscribes  cameras.topics (sensor_msgs/Image or CompressedImage, sensor-data QoS), arms.state_topics
                (sensor_msgs/JointState), instruction.topic (std_msgs/String, latched), estop.topic (std_msgs/Bool)
    publishes   the arm commands through output.adapter (per-arm topics), ~/action_chunk (qvla_msgs/ActionChunk),
                ~/quantization_status (qvla_msgs/QuantizationStatus, latched), /diagnostics
    services    ~/reload_policy (qvla_msgs/ReloadPolicy): swap the policy without a gap in the command stream;
                ~/episode (qvla_msgs/EpisodeControl): START clears the plan and starts from the measured arm state,
                STOP / DISCARD hold the arms until the next START

Threads: one single-threaded executor runs the input callbacks (they only store messages), the 30 Hz control timer
and diagnostics; the services run on a helper node in a second executor thread (a reload blocks for seconds); the
inference worker (qvla_ros.control.worker) is a thread of its own that pulls the newest synchronized observation,
has the policy predict (in a child process by default) and schedules the chunk. The control tick asks the scheduler
for the blended target, runs the safety filter and publishes; it never waits for inference. A stopped camera, a
stale arm state, a failed inference or an e-stop make it hold the last safe command, say why (log + /diagnostics,
sent at once), and resume when the inputs return. (rclpy's MultiThreadedExecutor was measured here: 30% of a core
and 120 ms p99 timer jitter for the 190 input messages/s, against 8% and 37 ms single-threaded.) With the process
worker, the executor thread runs SCHED_FIFO (control.realtime_priority) where the OS permits it, and the inference
process runs niced (policy.worker_nice): other work on the machine then cannot delay a tick.

This module is the ROS side only: parameters, subscriptions, timers, publishers, services, and the conversion
between messages and plain data. Every decision (which observation the policy gets, when to hold and why, the
fault epochs, what /diagnostics says) is qvla_ros.control.loop, unit-tested without ROS.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, String

from qvla_msgs.msg import ActionChunk, QuantizationStatus
from qvla_msgs.srv import EpisodeControl, ReloadPolicy
from qvla_ros.control.arm_outputs import ArmOutputError, JointStateParser, make_arm_output
from qvla_ros.control.images import (
    ImageFormatError,
    check_compressed,
    check_image,
    compressed_to_rgb,
    image_to_rgb,
)
from qvla_ros.control.loop import ERROR, OK, WARN, ControlLoop, ObservationInputs, WorkerReport, diagnostics
from qvla_ros.control.messages import MessageError, fill, import_message_type
from qvla_ros.control.params import POLICY_NODE, ParameterError
from qvla_ros.control.safety import ArmDescriptionError, load_arm_description
from qvla_ros.control.worker import InferenceWorker, PolicyInfo
from qvla_ros.nodes import declare_schema, fail, guard_dynamic, qos, spin, to_seconds
from qvla_ros.paths import config_path

NODE_NAME = "policy_node"
_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


class PolicyNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = declare_schema(self, POLICY_NODE, POLICY_NODE.defaults())
        c = self.cfg
        if not c["policy.path"]:
            raise ParameterError(
                "parameter policy.path is empty: give the policy directory or artifact to run "
                "(-p policy.path:=DIR, or policy:=DIR with qvla-bringup / ros2 launch)"
            )
        if not Path(c["policy.path"]).exists():
            raise ParameterError(f"parameter policy.path: {c['policy.path']} does not exist")
        self.joint_names = list(c["arms.joint_names"])
        self.arm_names = list(c["arms.names"])
        desc_file = c["safety.arm_description"]
        desc_path = Path(desc_file) if "/" in desc_file else config_path(desc_file)
        self.desc = load_arm_description(desc_path, c["safety.arm_profile"], self.joint_names, len(self.arm_names))
        self.rate_hz = c["control.rate_hz"]
        self.period = 1.0 / self.rate_hz
        lead = c["output.trajectory_time_from_start"] or self.period
        self.arm_output = make_arm_output(
            c["output.adapter"],
            self.arm_names,
            self.joint_names,
            c["output.topics"],
            time_from_start=lead,
            joint_velocity=c["output.y1_joint_velocity"],
            gripper_velocity=c["output.y1_gripper_velocity"],
            gripper_sdk_max=float(self.desc.gripper.get("sdk_max", 100.0)),
        )
        self.state_parser = JointStateParser(self.arm_names, self.joint_names)

        # ---- the decisions (ROS-free): gating, hold reasons, fault epochs, the plan, the safety filter
        msg_type = Image if c["cameras.transport"] == "raw" else CompressedImage
        self.check_frame = check_image if msg_type is Image else check_compressed
        self.loop = ControlLoop(c, self.desc, decode=image_to_rgb if msg_type is Image else compressed_to_rgb)
        self.realtime = "normal scheduling"

        # ---- ROS interfaces
        for name, topic in zip(c["cameras.names"], c["cameras.topics"]):
            self.create_subscription(msg_type, topic, lambda m, n=name: self._on_camera(n, m), qos(c["cameras.qos"]))
        for arm, topic in zip(self.arm_names, c["arms.state_topics"]):
            self.create_subscription(JointState, topic, lambda m, a=arm: self._on_state(a, m), qos("sensor_data"))
        self.create_subscription(String, c["instruction.topic"], self._on_instruction, qos("transient_local"))
        self.create_subscription(Bool, c["estop.topic"], self._on_estop, qos("reliable"))

        out_type = import_message_type(self.arm_output.msg_type)
        self.out_type = out_type
        self.command_pubs = {
            o.topic: self.create_publisher(out_type, o.topic, qos("reliable")) for o in self.arm_output.arm_topics
        }
        self.chunk_pub = self.create_publisher(ActionChunk, "~/action_chunk", qos("reliable"))
        self.quant_pub = self.create_publisher(QuantizationStatus, "~/quantization_status", qos("transient_local"))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos("reliable"))

        self.add_on_set_parameters_callback(guard_dynamic(POLICY_NODE, self.cfg))
        self.add_post_set_parameters_callback(self._apply_parameters)

        # ---- inference off the control loop
        self.worker = InferenceWorker(
            c["policy.worker"],
            c["policy.path"],
            get_observation=self._next_observation,
            on_chunk=self._on_chunk,
            on_error=self._on_inference_error,
            on_loaded=self._on_loaded,
            check=self.loop.check_policy,
            device=c["policy.device"],
            warmup=c["policy.warmup"],
            nice=c["policy.worker_nice"],
            torch_threads=c["policy.torch_threads"],
            min_interval=c["policy.min_interval"],
        )
        self.worker.start()

        # ---- the 30 Hz control loop (the other callbacks of this executor are short: they only store messages)
        self.create_timer(self.period, self._control_tick)
        self.create_timer(c["diagnostics.period"], self._publish_diagnostics)
        self.get_logger().info(
            f"policy {c['policy.path']} ({c['policy.worker']} worker, {c['policy.device']}), "
            f"{self.rate_hz:.0f} Hz via {self.arm_output.name} on {', '.join(self.command_pubs)}, "
            f"limits: {self.desc.profile}, blending: {c['control.blending']}"
        )

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---------------------------------------------------------------- inputs (store only)
    def _on_camera(self, name: str, msg) -> None:
        now = self.now()
        # field checks only (no pixels): a malformed frame is refused at once, with the reason, instead of making
        # the camera look stale 120 ms later
        try:
            self.check_frame(msg, f"camera '{name}'")
        except ImageFormatError as e:
            self.loop.refuse_frame(name, str(e))
            return
        stamp = to_seconds(msg.header.stamp) or now  # drivers that leave stamps at zero: arrival time
        self.loop.add_frame(name, stamp, now, msg, msg.header.stamp)

    def _on_state(self, arm: str, msg: JointState) -> None:
        now = self.now()
        try:
            q = self.state_parser.parse(msg, arm)
        except MessageError as e:
            self.loop.refuse_state(arm, str(e))
            return
        self.loop.add_state(arm, to_seconds(msg.header.stamp) or now, now, q)

    def _on_instruction(self, msg: String) -> None:
        if msg.data != self.loop.instruction:
            self.get_logger().info(f"instruction: {msg.data!r}")
        self.loop.instruction = msg.data

    def _on_estop(self, msg: Bool) -> None:
        if bool(msg.data) != self.loop.estop:
            self.get_logger().warning("E-STOP engaged: holding" if msg.data else "e-stop released")
        self.loop.estop = bool(msg.data)

    # ---------------------------------------------------------------- inference worker callbacks (worker thread)
    def _next_observation(self):
        before = self.loop.input_error
        got = self.loop.next_observation(self.now())
        if self.loop.input_error and self.loop.input_error != before:
            self.get_logger().error(self.loop.input_error)
        return got

    def _on_chunk(self, chunk, epoch) -> None:
        current, inputs = self.loop.add_chunk(chunk, epoch, self.now())
        if current and self.cfg["publish.chunks"] and self.context.ok():  # not while shutting down (Ctrl-C)
            self.chunk_pub.publish(self._chunk_message(chunk, inputs))

    def _chunk_message(self, chunk, inputs: ObservationInputs | None) -> ActionChunk:
        msg = ActionChunk()
        sec = int(chunk.stamp)
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec, int((chunk.stamp - sec) * 1e9)
        msg.model_id = chunk.model_id
        msg.joint_names = self.joint_names
        msg.horizon = int(chunk.actions.shape[0])
        msg.step_period = Duration(sec=int(chunk.step_period), nanosec=int((chunk.step_period % 1) * 1e9))
        msg.positions = np.asarray(chunk.actions, dtype=np.float64).ravel().tolist()
        msg.inference_latency = float(chunk.latency)
        if inputs is not None:  # what the observation was built from: a monitor rebuilds it exactly
            msg.episode, msg.instruction = inputs.episode, inputs.instruction
            msg.camera_names, msg.camera_stamps = inputs.camera_names, inputs.camera_stamps
            msg.state = np.asarray(inputs.state, dtype=np.float64).tolist()
        return msg

    def _on_inference_error(self, message: str, epoch) -> None:
        if self.loop.inference_failed(message):
            self.get_logger().error(message)

    def _on_loaded(self, info: PolicyInfo) -> None:
        self.loop.policy_loaded(info)
        self.get_logger().info(
            f"policy {info.model_id} ready ({info.load_seconds:.1f} s; horizon {info.horizon} "
            f"x {info.step_period * 1e3:.1f} ms; cameras {', '.join(info.camera_names)})"
        )
        q = info.quantization
        msg = QuantizationStatus()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.artifact_id = str(q.get("artifact_id", info.path))
        msg.average_bits = float(q.get("average_bits", 0.0))
        msg.roles = [str(r) for r in q.get("roles", [])]
        msg.role_average_bits = [float(b) for b in q.get("role_average_bits", [])]
        msg.pruned_fraction = float(q.get("pruned_fraction", 0.0))
        msg.weight_bytes = int(q.get("weight_bytes", 0))
        msg.fp_weight_bytes = int(q.get("fp_weight_bytes", 0))
        msg.plan_hash = str(q.get("plan_hash", ""))
        if self.context.ok():
            self.quant_pub.publish(msg)

    # ---------------------------------------------------------------- the control loop
    def _control_tick(self) -> None:
        loop = self.loop
        loop.rate.tick(time.monotonic())
        loop.cycle.begin()
        now = self.now()
        d = loop.tick(now, self.worker.status, self.worker.load_error)
        if d.command is not None:
            with loop.cycle.section("publish"):
                for topic, fields in self.arm_output.build(d.command, now):
                    self.command_pubs[topic].publish(fill(self.out_type(), fields))
        loop.cycle.end()
        if d.changed:
            if d.held:
                self.get_logger().warning(f"holding the last safe command: {d.why}")
            else:
                self.get_logger().info("inputs back: streaming policy commands")
            self._publish_diagnostics()

    # ---------------------------------------------------------------- services and parameters
    def _on_reload(self, request, response):
        path = request.artifact_path
        if not path or not Path(path).exists():
            response.success = False
            response.message = f"refused: {path!r} does not exist (the old policy keeps running)"
            return response
        self.get_logger().info(f"reloading the policy from {path} (the command stream continues)")
        ok, message = self.worker.reload(path)
        # one call site per severity: rclpy refuses a call site that changes severity (ValueError)
        if ok:
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)
        response.success, response.message = ok, message
        return response

    def _on_episode(self, request, response):
        if request.command == EpisodeControl.Request.START:
            episode = self.loop.start_episode(self.now(), request.instruction)
            response.success, response.episode_id = True, str(episode)
            response.message = f"episode {episode} started"
        elif request.command in (EpisodeControl.Request.STOP, EpisodeControl.Request.DISCARD):
            episode = self.loop.stop_episode()
            response.success, response.episode_id = True, str(episode)
            response.message = f"episode {episode} stopped: holding"
        else:
            response.success = False
            response.message = f"unknown command {request.command} (START=0, STOP=1, DISCARD=2)"
        self.get_logger().info(response.message)
        return response

    def _apply_parameters(self, params) -> None:
        for p in params:
            self.cfg[p.name] = list(p.value) if isinstance(p.value, (list, tuple)) else p.value
        self.worker.min_interval = self.cfg["policy.min_interval"]
        self.loop.apply_parameters([p.name for p in params])
        self.get_logger().info("parameters updated: " + ", ".join(f"{p.name}={p.value}" for p in params))

    # ---------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        reports = diagnostics(
            self.loop,
            self.now(),
            self.get_fully_qualified_name(),
            WorkerReport.of(self.worker),
            self.arm_output.name,
            self.realtime,
        )
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [
            DiagnosticStatus(
                name=r.name,
                hardware_id=r.hardware_id,
                level=_LEVELS[r.level],
                message=r.message,
                values=[KeyValue(key=k, value=v) for k, v in r.values.items()],
            )
            for r in reports
        ]
        self.diag_pub.publish(arr)

    def use_realtime_priority(self) -> None:
        """Call from the thread that spins the control timer: SCHED_FIFO for it (not for threads or processes it
        starts later: reset on fork), so that other work on the machine cannot delay a tick."""
        prio = self.cfg["control.realtime_priority"]
        self.realtime = "normal scheduling"
        if prio <= 0:
            return
        if self.cfg["policy.worker"] == "thread":
            # inference in this process holds the GIL: a real-time thread waiting for it behind a normal-priority
            # holder is a priority inversion (bench/bench_runtime.py measured 2 s stalls)
            self.get_logger().info(
                "control.realtime_priority is not used with policy.worker thread (GIL priority "
                "inversion); use the process worker for real-time scheduling"
            )
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(prio))
            self.realtime = f"SCHED_FIFO {prio}"
        except (AttributeError, PermissionError, OSError) as e:
            self.get_logger().info(
                f"control thread runs with normal scheduling ({e}); for real-time priority give "
                "the process CAP_SYS_NICE or an rtprio limit, or set control.realtime_priority:=0"
            )

    def shutdown(self) -> None:
        self.worker.stop()


class PolicyServices(Node):
    """The policy node's services, served by a helper node in an executor of their own: a reload blocks its caller
    for seconds (load + warm-up), which must delay neither the camera callbacks nor the control timer."""

    def __init__(self, policy: PolicyNode):
        super().__init__(f"{policy.get_name()}_services", namespace=policy.get_namespace())
        self.create_service(
            ReloadPolicy,
            policy.resolve_service_name("~/reload_policy"),
            self._guarded("reload_policy", policy._on_reload),
        )
        self.create_service(
            EpisodeControl, policy.resolve_service_name("~/episode"), self._guarded("episode", policy._on_episode)
        )

    def _guarded(self, name: str, callback):
        """A service callback that cannot kill the services thread: an exception is logged and answered with
        success=False (an exception escaping into the executor would stop every later service call)."""

        def serve(request, response):
            try:
                return callback(request, response)
            except Exception as e:  # any bug or unexpected input: answer, log, keep serving
                response.success = False
                response.message = f"{name} failed: {type(e).__name__}: {e} (the node keeps running)"
                self.get_logger().error(response.message)
                return response

        return serve


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv)
    node = services = None
    try:
        try:
            node = PolicyNode()
        except (ParameterError, ArmOutputError, MessageError, ArmDescriptionError, FileNotFoundError) as e:
            return fail(NODE_NAME, e)
        services = PolicyServices(node)
        # Single-threaded executors: rclpy's MultiThreadedExecutor cost 30% of a core and 120 ms p99 timer jitter
        # for 190 input messages/s on a 2-core machine, the single-threaded one 8% and 37 ms.
        service_executor = SingleThreadedExecutor()
        service_executor.add_node(services)
        threading.Thread(target=spin, args=(service_executor,), name="qvla-services", daemon=True).start()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        node.use_realtime_priority()  # this thread runs the control timer
        spin(executor)
    finally:
        for n in (services, node):
            if n is not None:
                if n is node:
                    node.shutdown()
                n.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
