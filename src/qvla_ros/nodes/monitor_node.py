"""The monitor node: how far the running (quantized) policy's actions drift from the full-precision reference's, live.

    subscribes  monitor.chunk_topic (qvla_msgs/ActionChunk: the policy node's chunks, each naming the camera frames,
                state and instruction it was predicted from), cameras.topics (the same frames, same QoS as the policy
                node), arms.state_topics (measured joints) and the policy node's command topics (output.adapter)
    publishes   ~/deviation (qvla_msgs/ActionDeviation, one per compared chunk), ~/markers
                (visualization_msgs/MarkerArray: both arms' predicted gripper paths over the chunk, policy and
                reference, in monitor.markers.frame), /diagnostics (a status per thresholded deviation, the
                reference, the fallback)
    calls       monitor.fallback.service (qvla_msgs/ReloadPolicy) once, with monitor.fallback.path, when a deviation
                has stayed at the error level for monitor.fallback.hold seconds (off when the path is '')

The reference runs in an inference worker (qvla_ros.control.worker: a niced child process by default) on exactly the
observation the policy used, so an identical policy deviates by exactly 0; when it cannot keep up it skips chunks and
counts them. The node's own process is niced too (monitor.nice): it never competes with the policy node's control
loop. Episodes: a chunk with a new ActionChunk.episode (the policy node's EpisodeControl START count) resets the
cumulative deviation, so whoever starts episodes on the policy node (the demo, an operator) resets the monitor too.
The logic (matching, Eq. 4/5, thresholds, fallback timer, kinematics, markers) is in qvla_ros.control.deviation.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from qvla_msgs.msg import ActionChunk, ActionDeviation
from qvla_msgs.srv import ReloadPolicy
from qvla_ros.control.arm_outputs import ArmOutputError, JointStateParser, make_arm_output
from qvla_ros.control.deviation import (
    ERROR,
    OK,
    POLICY_QUANTITIES,
    QUANTITIES,
    WARN,
    ChunkRecord,
    DeviationMonitor,
    FallbackTimer,
    GripperFK,
    Thresholds,
    TrackingError,
    deviation_values,
    path_markers,
    stamp_ns,
)
from qvla_ros.control.images import ImageFormatError, compressed_to_rgb, image_to_rgb
from qvla_ros.control.messages import MessageError, import_message_type
from qvla_ros.control.params import MONITOR_NODE, ParameterError
from qvla_ros.control.timing import LatencyStats
from qvla_ros.control.worker import InferenceWorker, PolicyInfo
from qvla_ros.nodes import declare_schema, guard_dynamic, qos, run_node, to_seconds
from qvla_ros.policy.types import Observation

NODE_NAME = "monitor"
LEVEL = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}  # int -> the msg's byte


def check_reference_path(path: str) -> None:
    """ParameterError naming monitor.reference_path unless it is a full-precision policy directory."""
    name = "monitor.reference_path"
    if not path:
        raise ParameterError(
            f"parameter {name} is empty: give the full-precision policy to compare with "
            f"(-p {name}:=DIR, or reference:=DIR with qvla-bringup / ros2 launch)"
        )
    p = Path(path)
    if not p.is_dir():
        raise ParameterError(f"parameter {name}: {path} does not exist (or is not a directory)")
    # imported here: qvla_quant and the processor import torch (~2 s), which only this start-up check needs
    from qvla_quant.files import CONFIG_FILE, TENSORS_FILE, is_artifact, recorded_source
    from qvla_ros.policy.processor import PROCESSOR_FILE

    if is_artifact(p):
        source = recorded_source(p)
        raise ParameterError(
            f"parameter {name}: {path} is a quantized qvla_quant artifact, not a full-precision "
            "policy; the reference must be the float policy"
            + (f" (this artifact was made from {source})" if source else "")
        )
    missing = [f for f in (PROCESSOR_FILE, CONFIG_FILE, TENSORS_FILE) if not (p / f).is_file()]
    if missing:
        raise ParameterError(f"parameter {name}: {path} is not a policy directory (no {', '.join(missing)})")


class MonitorNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = declare_schema(self, MONITOR_NODE, MONITOR_NODE.defaults())
        c = self.cfg
        check_reference_path(c["monitor.reference_path"])
        if c["monitor.nice"] > 0 and hasattr(os, "nice"):
            os.nice(c["monitor.nice"])  # the whole node (and its reference process): the policy node comes first
        self.joint_names = list(c["arms.joint_names"])
        self.arm_names = list(c["arms.names"])
        self.camera_names = list(c["cameras.names"])
        self.arm_output = make_arm_output(c["output.adapter"], self.arm_names, self.joint_names, c["output.topics"])
        self.state_parser = JointStateParser(self.arm_names, self.joint_names)
        self.logic = DeviationMonitor(
            self.joint_names,
            self.arm_names,
            self.camera_names,
            frame_buffer=c["monitor.frame_buffer"],
            queue_depth=c["monitor.queue_depth"],
            match_timeout=c["monitor.match_timeout"],
        )
        self.tracking = TrackingError(self.arm_names, c["monitor.tracking.max_gap"])
        try:
            self.thresholds = Thresholds({q: c[f"monitor.thresholds.{q}"] for q in QUANTITIES})
            self.fallback = FallbackTimer(c["monitor.fallback.hold"], enabled=bool(c["monitor.fallback.path"]))
        except ValueError as e:
            raise ParameterError(str(e)) from None
        if c["monitor.fallback.path"] and not Path(c["monitor.fallback.path"]).exists():
            raise ParameterError(
                f"parameter monitor.fallback.path: {c['monitor.fallback.path']} does not exist "
                "('' turns the fallback off)"
            )
        self.fk = None
        self.markers_note = "off (monitor.markers.enabled is false)"
        if c["monitor.markers.enabled"]:
            try:
                self.fk = GripperFK(
                    c["monitor.markers.model"],
                    c["monitor.markers.arm_joints"],
                    c["monitor.markers.tip_bodies"],
                    c["monitor.markers.tip_offset"],
                    n_arms=len(self.arm_names),
                )
                self.markers_note = f"gripper paths from {self.fk.model_path}"
            except ValueError as e:
                raise ParameterError(f"monitor.markers: {e}") from None
            except ImportError as e:  # no MuJoCo (or gym-aloha for the default model) on this machine
                if c["monitor.markers.model"]:
                    raise ParameterError(f"monitor.markers.model needs MuJoCo: {e}") from None
                self.markers_note = f"off: {e} (install mujoco and gym-aloha, or give monitor.markers.model)"
                self.get_logger().warning(f"markers {self.markers_note}")

        # ---- state shared between the executor and the worker thread (each attribute written by one thread)
        self.last_result = None
        self.last_checks = []
        self.last_tracking: tuple[list[float], float] = ([math.nan] * len(self.arm_names), math.nan)
        self.reference_info: PolicyInfo | None = None
        self.reference_error = ""
        self.input_error = ""
        self.fallback_message = ""
        self.reference_latency = LatencyStats()
        self.marker_updates = 0

        # ---- ROS interfaces
        msg_type = Image if c["cameras.transport"] == "raw" else CompressedImage
        self.to_rgb = image_to_rgb if msg_type is Image else compressed_to_rgb
        for name, topic in zip(self.camera_names, c["cameras.topics"]):
            self.create_subscription(msg_type, topic, lambda m, n=name: self._on_camera(n, m), qos(c["cameras.qos"]))
        for arm, topic in zip(self.arm_names, c["arms.state_topics"]):
            self.create_subscription(JointState, topic, lambda m, a=arm: self._on_state(a, m), qos("sensor_data"))
        cmd_type = import_message_type(self.arm_output.msg_type)
        for o in self.arm_output.arm_topics:
            self.create_subscription(cmd_type, o.topic, lambda m, a=o.arm: self._on_command(a, m), qos("reliable"))
        self.create_subscription(ActionChunk, c["monitor.chunk_topic"], self._on_chunk, qos("reliable", depth=20))
        self.deviation_pub = self.create_publisher(ActionDeviation, "~/deviation", qos("reliable"))
        self.marker_pub = self.create_publisher(MarkerArray, "~/markers", qos("reliable"))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos("reliable"))
        self.reload_client = self.create_client(ReloadPolicy, c["monitor.fallback.service"])
        self.add_on_set_parameters_callback(guard_dynamic(MONITOR_NODE, self.cfg))
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.worker = InferenceWorker(
            c["monitor.worker"],
            c["monitor.reference_path"],
            get_observation=self._next_observation,
            on_chunk=self._on_reference,
            on_error=self._on_reference_error,
            on_loaded=self._on_loaded,
            check=self._check_reference,
            device=c["monitor.device"],
            warmup=True,
            nice=c["monitor.worker_nice"],
            torch_threads=c["monitor.torch_threads"],
            min_interval=c["monitor.min_interval"],
        )
        self.worker.start()
        self.create_timer(c["diagnostics.period"], self._publish_diagnostics)
        self.create_timer(0.1, self._fallback_tick)
        self.get_logger().info(
            f"reference {c['monitor.reference_path']} ({c['monitor.worker']} worker, {c['monitor.device']}) vs the "
            f"chunks on {c['monitor.chunk_topic']}; markers: {self.markers_note}; fallback: "
            + (
                f"{c['monitor.fallback.path']} after {c['monitor.fallback.hold']:g} s at error"
                if c["monitor.fallback.path"]
                else "off"
            )
        )

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---------------------------------------------------------------- inputs (store only)
    def _on_camera(self, name: str, msg) -> None:
        self.logic.add_frame(name, stamp_ns(msg.header.stamp.sec, msg.header.stamp.nanosec), self.now(), msg)

    def _on_state(self, arm: str, msg: JointState) -> None:
        try:
            q = self.state_parser.parse(msg, arm)
        except MessageError:
            return
        self.tracking.add_state(arm, to_seconds(msg.header.stamp) or self.now(), q)

    def _on_command(self, arm: str, msg) -> None:
        try:
            q = self.arm_output.parse(msg, arm)
        except MessageError:
            return
        h = getattr(msg, "header", None)
        self.tracking.add_command(arm, (to_seconds(h.stamp) if h is not None else 0.0) or self.now(), q)

    def _on_chunk(self, msg: ActionChunk) -> None:
        n = len(msg.joint_names)
        positions = np.asarray(msg.positions, dtype=np.float64)
        actions = (
            positions.reshape(int(msg.horizon), n)
            if n and positions.size == int(msg.horizon) * n
            else positions.reshape(1, -1)
        )
        stamps = [stamp_ns(t.sec, t.nanosec) for t in msg.camera_stamps]
        self.logic.add_chunk(
            ChunkRecord(
                stamp=to_seconds(msg.header.stamp),
                episode=int(msg.episode),
                model_id=msg.model_id,
                joint_names=list(msg.joint_names),
                actions=actions,
                instruction=msg.instruction,
                camera_names=list(msg.camera_names),
                camera_stamps=stamps,
                state=np.asarray(msg.state, np.float64),
                step_period=msg.step_period.sec + msg.step_period.nanosec * 1e-9,
                header_ns=stamp_ns(msg.header.stamp.sec, msg.header.stamp.nanosec),
            ),
            self.now(),
        )

    # ---------------------------------------------------------------- the reference (worker thread)
    def _next_observation(self):
        job = self.logic.next_job(self.now())
        if job is None:
            return None
        try:
            images = {name: np.array(self.to_rgb(m, f"camera '{name}'")) for name, m in job.frames.items()}
        except ImageFormatError as e:
            self.input_error = str(e)
            self.logic.note_unmatched(str(e))
            return None
        self.input_error = ""
        c = job.chunk
        return Observation(images=images, state=c.state, instruction=c.instruction, stamp=c.stamp), job

    def _on_reference(self, chunk, job) -> None:
        self.reference_error = ""
        self.reference_latency.add(chunk.latency)
        result = self.logic.finish(job, chunk.actions, chunk.latency)
        if result is None or not self.context.ok():
            return
        tracking = self.tracking.latest()
        self.last_tracking = tracking
        self.last_checks = self.thresholds.evaluate(deviation_values(result, tracking[0]))
        self.last_result = result
        self.deviation_pub.publish(self._deviation_msg(result, tracking))
        if self.fk is not None:
            self.marker_pub.publish(self._markers(result))
            self.marker_updates += 1

    def _on_reference_error(self, message: str, tag) -> None:
        if message != self.reference_error:
            self.get_logger().error(f"reference: {message}")
        self.reference_error = message

    def _on_loaded(self, info: PolicyInfo) -> None:
        self.reference_info = info
        self.get_logger().info(f"reference {info.model_id} loaded in {info.load_seconds:.1f} s")

    def _check_reference(self, info: PolicyInfo) -> str:
        if list(info.joint_names) != self.joint_names:
            return (
                f"reference joint names {info.joint_names} differ from arms.joint_names {self.joint_names}: "
                "it is not a policy of this rig"
            )
        if info.quantization.get("artifact_id", "fp") != "fp":
            return f"reference {info.path} is quantized ({info.quantization.get('artifact_id')}): not a float policy"
        return ""

    # ---------------------------------------------------------------- messages
    def _deviation_msg(self, r, tracking) -> ActionDeviation:
        m = ActionDeviation()
        m.header.stamp.sec, m.header.stamp.nanosec = divmod(int(r.header_ns), 1_000_000_000)
        m.episode, m.episode_step = int(r.episode), int(r.episode_step)
        m.model_id = r.model_id
        m.reference_id = self.reference_info.model_id if self.reference_info else ""
        m.arm_names = list(r.arm_names)
        m.first_action_l2, m.chunk_l2, m.cumulative_l2 = r.first_action_l2, r.chunk_l2, r.cumulative_l2
        m.first_action_l2_total, m.chunk_l2_total = r.first_action_l2_total, r.chunk_l2_total
        m.cumulative_l2_total = r.cumulative_l2_total
        m.cumulative_first_action_l2_total = r.cumulative_first_action_l2_total
        m.max_joint_deviation, m.max_joint_name, m.max_joint_step = (
            r.max_joint_deviation,
            r.max_joint_name,
            r.max_joint_step,
        )
        m.tracking_l2 = [float(x) for x in tracking[0]]
        m.tracking_age = float(tracking[1])
        m.reference_latency = r.reference_latency
        counts = self.logic.counters()
        m.compared, m.skipped, m.unmatched = counts["compared"], counts["skipped"], counts["unmatched"]
        return m

    def _markers(self, r) -> MarkerArray:
        paths = {"quantized": self.fk.paths(r.actions), "reference": self.fk.paths(r.reference)}
        arr = MarkerArray()
        for d in path_markers(paths, self.arm_names, self.cfg["monitor.markers.frame"]):
            mk = Marker()
            mk.header.frame_id = d["frame_id"]
            mk.header.stamp.sec, mk.header.stamp.nanosec = divmod(int(r.header_ns), 1_000_000_000)
            mk.ns, mk.id, mk.type, mk.action = d["ns"], d["id"], d["type"], Marker.ADD
            mk.pose.orientation.w = 1.0
            mk.scale.x, mk.scale.y, mk.scale.z = d["scale"]
            mk.color = ColorRGBA(r=d["color"][0], g=d["color"][1], b=d["color"][2], a=d["color"][3])
            mk.points = [Point(x=p[0], y=p[1], z=p[2]) for p in d["points"]]
            arr.markers.append(mk)
        return arr

    # ---------------------------------------------------------------- fallback and diagnostics (executor thread)
    def _policy_level(self) -> int:
        return max((ch.level for ch in self.last_checks if ch.name in POLICY_QUANTITIES), default=OK)

    def _fallback_tick(self) -> None:
        now = time.monotonic()
        if not self.fallback.update(self._policy_level(), now):
            return
        path = self.cfg["monitor.fallback.path"]
        worst = [f"{ch.name} {ch.message}" for ch in self.last_checks if ch.level >= ERROR]
        self.fallback_message = f"fallback requested: {path} (error held {self.fallback.hold:g} s: {'; '.join(worst)})"
        self.get_logger().warning(self.fallback_message)
        if not self.reload_client.service_is_ready():
            self.fallback_message += f"; but {self.cfg['monitor.fallback.service']} is not available"
            self.get_logger().error(self.fallback_message)
        else:
            fut = self.reload_client.call_async(ReloadPolicy.Request(artifact_path=path))
            fut.add_done_callback(self._on_fallback_done)
        self._publish_diagnostics()

    def _on_fallback_done(self, fut) -> None:
        try:
            res = fut.result()
            self.fallback_message += f"; policy node: {'loaded' if res.success else 'refused'}: {res.message}"
        except Exception as e:  # the call itself failed
            self.fallback_message += f"; the call failed: {e}"
        self.get_logger().info(self.fallback_message)
        self._publish_diagnostics()

    def _apply_parameters(self, params) -> None:
        for p in params:
            self.cfg[p.name] = list(p.value) if isinstance(p.value, (list, tuple)) else p.value
        self.worker.min_interval = self.cfg["monitor.min_interval"]

    def _publish_diagnostics(self) -> None:
        name = self.get_fully_qualified_name()

        def kv(**values):
            return [KeyValue(key=k, value=(f"{v:.6g}" if isinstance(v, float) else str(v))) for k, v in values.items()]

        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        counts = self.logic.counters()
        lat = self.reference_latency.summary()
        info = self.reference_info
        ref = DiagnosticStatus(name=f"{name}: reference", hardware_id=name)
        if self.worker.status != "running":
            ref.level = LEVEL[ERROR]
            ref.message = f"reference {self.worker.status} {self.worker.load_error}".strip()
        elif self.reference_error:
            ref.level, ref.message = LEVEL[ERROR], self.reference_error
        elif counts["compared"] == 0:
            ref.level = LEVEL[WARN]
            ref.message = "no chunk compared yet" + (f": {self.logic.last_problem}" if self.logic.last_problem else "")
        else:
            ref.level = LEVEL[OK]
            ref.message = (
                f"{info.model_id if info else ''}: {counts['compared']} chunks compared, {counts['skipped']} skipped"
            )
        ref.values = kv(
            reference_id=info.model_id if info else "",
            status=self.worker.status,
            device=self.cfg["monitor.device"],
            latency_p50_ms=lat["p50"] * 1e3,
            latency_p99_ms=lat["p99"] * 1e3,
            **counts,
            last_problem=self.logic.last_problem,
            input_error=self.input_error,
            markers=self.markers_note,
            marker_updates=self.marker_updates,
        )
        arr.status = [ref]
        r = self.last_result
        checks = self.last_checks or self.thresholds.evaluate(deviation_values(None, self.last_tracking[0]))
        for ch in checks:
            st = DiagnosticStatus(name=f"{name}: {ch.name}", hardware_id=name, level=LEVEL[ch.level])
            st.message = ch.message
            extra = {}
            if r is not None:
                extra = {"episode": r.episode, "episode_step": r.episode_step, "model_id": r.model_id}
                if ch.name == "max_joint":
                    extra.update(joint=r.max_joint_name, chunk_step=r.max_joint_step)
            if ch.name == "tracking":
                extra.update({f"tracking_{a}": v for a, v in zip(self.arm_names, self.last_tracking[0])})
            st.values = kv(value=ch.value, warn=ch.warn, error=ch.error, **extra)
            arr.status.append(st)
        fb = DiagnosticStatus(name=f"{name}: fallback", hardware_id=name)
        state = self.fallback.state(time.monotonic())
        if self.fallback.fired_at is not None:
            fb.level, fb.message = LEVEL[WARN], self.fallback_message
        else:
            fb.level = LEVEL[OK]
            fb.message = (
                f"{state}: {self.cfg['monitor.fallback.path']} after {self.fallback.hold:g} s at error"
                if self.fallback.enabled
                else "off (monitor.fallback.path is '')"
            )
        fb.values = kv(
            path=self.cfg["monitor.fallback.path"],
            hold_s=self.fallback.hold,
            state=state,
            fired=self.fallback.fired_at is not None,
        )
        arr.status.append(fb)
        if self.context.ok():
            self.diag_pub.publish(arr)

    def shutdown(self) -> None:
        self.worker.stop()


def main(argv: list[str] | None = None) -> int:
    return run_node(
        NODE_NAME,
        MonitorNode,
        (ParameterError, ArmOutputError, MessageError, FileNotFoundError),
        SingleThreadedExecutor,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
