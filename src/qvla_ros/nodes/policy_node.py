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
from qvla_ros.control.adapters import AdapterError, JointStateAdapter, fill, import_message_type, make_adapter
from qvla_ros.control.images import (
    ImageFormatError,
    check_compressed,
    check_image,
    compressed_to_rgb,
    image_to_rgb,
)
from qvla_ros.control.params import POLICY_NODE, ParameterError
from qvla_ros.control.safety import (
    ArmDescriptionError,
    SafetyFilter,
    load_arm_description,
    measured_state_problem,
)
from qvla_ros.control.scheduler import ChunkScheduler
from qvla_ros.control.sync import ApproxTimeSync, LatestStore
from qvla_ros.control.timing import CycleTimer, LatencyStats, RateMonitor
from qvla_ros.control.worker import InferenceWorker, PolicyInfo
from qvla_ros.nodes import declare_schema, fail, guard_dynamic, qos, spin, to_seconds
from qvla_ros.paths import config_path
from qvla_ros.policy.types import Observation

NODE_NAME = "policy_node"
# hold reasons that are not a fault of the inputs: nothing planned yet is no reason to discard chunks in flight
_NOT_FAULTS = {"no_action"}


class PolicyNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = declare_schema(self, POLICY_NODE, POLICY_NODE.defaults())
        c = self.cfg
        if not c["policy.path"]:
            raise ParameterError("parameter policy.path is empty: give the policy directory or artifact to run "
                                 "(-p policy.path:=DIR, or policy:=DIR with qvla-bringup / ros2 launch)")
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
        self.adapter = make_adapter(
            c["output.adapter"], self.arm_names, self.joint_names, c["output.topics"], time_from_start=lead,
            joint_velocity=c["output.y1_joint_velocity"], gripper_velocity=c["output.y1_gripper_velocity"],
            gripper_sdk_max=float(self.desc.gripper.get("sdk_max", 100.0)),
        )
        self.state_parser = JointStateAdapter(self.arm_names, self.joint_names)

        # ---- logic (ROS-free)
        self.cameras = ApproxTimeSync(c["cameras.names"], c["cameras.sync_slop"], c["cameras.max_age"])
        self.states = LatestStore(self.arm_names, c["arms.state_max_age"])
        self.scheduler = self._make_scheduler()
        self.safety = SafetyFilter(self.desc, self.rate_hz, c["safety.step_scale"])
        self.rate = RateMonitor(self.rate_hz)
        self.cycle = CycleTimer(self.rate_hz)
        self.inference_latency = LatencyStats()
        self.camera_to_command = LatencyStats()
        self.observation_to_chunk = LatencyStats()

        # ---- state shared between the callback threads (plain attributes: each is written by one thread)
        self.instruction = c["instruction.default"]
        self.estop = False
        self.paused = False
        self.epoch = 0
        self.inference_error = ""
        self.input_error = ""
        self.episode = 0
        self.episode_start = -1.0  # node-clock time of the last START: older inputs are not used after it
        self.last_obs_stamp = -1.0
        self.chunks_dropped = 0
        # per observation stamp, what it was built from (ActionChunk's observation fields, for the monitor); bounded
        self._used: dict[float, tuple] = {}
        self.sync_resets_seen = 0
        # per camera / arm: why its newest message was refused on arrival (cleared by the next good one)
        self.camera_errors: dict[str, str] = {}
        self.state_errors: dict[str, str] = {}
        self.policy_info: PolicyInfo | None = None
        self.last_decision = None
        self.realtime = "normal scheduling"
        self._fault_keys: frozenset[str] = frozenset()

        # ---- ROS interfaces
        msg_type = Image if c["cameras.transport"] == "raw" else CompressedImage
        self.to_rgb = image_to_rgb if msg_type is Image else compressed_to_rgb
        self.check_frame = check_image if msg_type is Image else check_compressed
        for name, topic in zip(c["cameras.names"], c["cameras.topics"]):
            self.create_subscription(msg_type, topic, lambda m, n=name: self._on_camera(n, m), qos(c["cameras.qos"]))
        for arm, topic in zip(self.arm_names, c["arms.state_topics"]):
            self.create_subscription(JointState, topic, lambda m, a=arm: self._on_state(a, m), qos("sensor_data"))
        self.create_subscription(String, c["instruction.topic"], self._on_instruction, qos("transient_local"))
        self.create_subscription(Bool, c["estop.topic"], self._on_estop, qos("reliable"))

        out_type = import_message_type(self.adapter.msg_type)
        self.out_type = out_type
        self.command_pubs = {o.topic: self.create_publisher(out_type, o.topic, qos("reliable"))
                             for o in self.adapter.outputs}
        self.chunk_pub = self.create_publisher(ActionChunk, "~/action_chunk", qos("reliable"))
        self.quant_pub = self.create_publisher(QuantizationStatus, "~/quantization_status", qos("transient_local"))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos("reliable"))

        self.add_on_set_parameters_callback(guard_dynamic(POLICY_NODE, self.cfg))
        self.add_post_set_parameters_callback(self._apply_parameters)

        # ---- inference off the control loop
        self.worker = InferenceWorker(
            c["policy.worker"], c["policy.path"], get_observation=self._next_observation, on_chunk=self._on_chunk,
            on_error=self._on_inference_error, on_loaded=self._on_loaded, check=self._check_policy,
            device=c["policy.device"], warmup=c["policy.warmup"], nice=c["policy.worker_nice"],
            torch_threads=c["policy.torch_threads"], min_interval=c["policy.min_interval"],
        )
        self.worker.start()

        # ---- the 30 Hz control loop (the other callbacks of this executor are short: they only store messages)
        self.create_timer(self.period, self._control_tick)
        self.create_timer(c["diagnostics.period"], self._publish_diagnostics)
        self.get_logger().info(
            f"policy {c['policy.path']} ({c['policy.worker']} worker, {c['policy.device']}), "
            f"{self.rate_hz:.0f} Hz via {self.adapter.name} on {', '.join(self.command_pubs)}, "
            f"limits: {self.desc.profile}, blending: {c['control.blending']}"
        )

    def _make_scheduler(self) -> ChunkScheduler:
        c = self.cfg
        return ChunkScheduler(len(self.joint_names), mode=c["control.blending"], decay=c["control.ensemble_decay"],
                              new_weight=c["control.overlap_new_weight"], ramp=c["control.blend_ramp"])

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
            self.camera_errors[name] = str(e)
            return
        self.camera_errors.pop(name, None)
        stamp = to_seconds(msg.header.stamp) or now  # drivers that leave stamps at zero: arrival time
        self.cameras.add(name, stamp, now, msg)

    def _on_state(self, arm: str, msg: JointState) -> None:
        now = self.now()
        try:
            q = self.state_parser.parse(msg, arm)
        except AdapterError as e:
            self.state_errors[arm] = f"arm state: {e}"
            return
        why = measured_state_problem(self.desc, q, self.arm_names.index(arm) * len(q), self.cfg["safety.state_margin"])
        if why:
            self.state_errors[arm] = f"arm state of {arm}: {why}"
            return
        self.state_errors.pop(arm, None)
        self.states.add(arm, to_seconds(msg.header.stamp) or now, now, q)

    def _on_instruction(self, msg: String) -> None:
        if msg.data != self.instruction:
            self.get_logger().info(f"instruction: {msg.data!r}")
        self.instruction = msg.data

    def _on_estop(self, msg: Bool) -> None:
        if bool(msg.data) != self.estop:
            self.get_logger().warning("E-STOP engaged: holding" if msg.data else "e-stop released")
        self.estop = bool(msg.data)

    def _state_vector(self, now: float) -> np.ndarray | None:
        """The measured 14-dim state, or None when an arm's state is missing, stale, refused, or older than START.
        (States are parsed and checked on arrival: the store holds each arm's last valid 7 values.)"""
        if self.state_errors:
            return None
        latest = self.states.latest()
        parts = []
        for arm in self.arm_names:
            s = latest[arm]
            if s is None or now - s.received > self.states.max_age or s.received < self.episode_start:
                return None
            parts.append(s.msg)
        return np.concatenate(parts)

    # ---------------------------------------------------------------- inference worker callbacks (worker thread)
    def _next_observation(self):
        if self.estop or self.paused or not self.instruction:
            return None
        now = self.now()
        if self.camera_errors:
            return None
        if self.cameras.resets != self.sync_resets_seen:
            # a camera's clock restarted: stamps from before it say nothing about what is new now
            self.sync_resets_seen = self.cameras.resets
            self.last_obs_stamp = -1.0
        sync = self.cameras.newest(now)
        if not sync.ok or sync.stamp <= self.last_obs_stamp:
            return None
        if any(item.received < self.episode_start for item in sync.items.values()):
            return None
        state = self._state_vector(now)
        if state is None:
            return None
        try:
            # copies: the conversion may return read-only views of the message buffers
            images = {name: np.array(self.to_rgb(item.msg, f"camera '{name}'")) for name, item in sync.items.items()}
        except ImageFormatError as e:
            if str(e) != self.input_error:
                self.get_logger().error(str(e))
            self.input_error = str(e)
            return None
        self.input_error = ""
        self.last_obs_stamp = sync.stamp
        instruction = self.instruction
        # the exact frames (header stamps), state and instruction, for ActionChunk (oldest forgotten first)
        self._used[sync.stamp] = (self.episode, instruction, list(sync.items),
                                  [item.msg.header.stamp for item in sync.items.values()], state)
        while len(self._used) > 16:
            self._used.pop(next(iter(self._used)))
        return Observation(images=images, state=state, instruction=instruction, stamp=sync.stamp), self.epoch

    def _on_chunk(self, chunk, epoch) -> None:
        now = self.now()
        used = self._used.pop(chunk.stamp, None)
        self.inference_latency.add(chunk.latency)
        self.observation_to_chunk.add(now - chunk.stamp)
        self.inference_error = ""
        if epoch != self.epoch:
            self.chunks_dropped += 1  # predicted from inputs that came before a fault or a new episode
            return
        if not self.scheduler.add(chunk.actions, chunk.stamp, chunk.step_period, now, chunk.model_id):
            self.chunks_dropped += 1
        if self.cfg["publish.chunks"] and self.context.ok():  # not while shutting down (Ctrl-C)
            msg = ActionChunk()
            sec = int(chunk.stamp)
            msg.header.stamp.sec, msg.header.stamp.nanosec = sec, int((chunk.stamp - sec) * 1e9)
            msg.model_id = chunk.model_id
            msg.joint_names = self.joint_names
            msg.horizon = int(chunk.actions.shape[0])
            msg.step_period = Duration(sec=int(chunk.step_period), nanosec=int((chunk.step_period % 1) * 1e9))
            msg.positions = np.asarray(chunk.actions, dtype=np.float64).ravel().tolist()
            msg.inference_latency = float(chunk.latency)
            if used is not None:  # what the observation was built from: a monitor rebuilds it exactly
                msg.episode, msg.instruction, msg.camera_names, msg.camera_stamps = used[:4]
                msg.state = np.asarray(used[4], dtype=np.float64).tolist()
            self.chunk_pub.publish(msg)

    def _on_inference_error(self, message: str, epoch) -> None:
        if message != self.inference_error:
            self.get_logger().error(message)
        self.inference_error = message

    def _check_policy(self, info: PolicyInfo) -> str:
        if list(info.joint_names) != self.joint_names:
            return (f"the policy's joints {info.joint_names} differ from arms.joint_names {self.joint_names} "
                    "(same names in the same order are required)")
        missing = [c for c in info.camera_names if c not in self.cameras.names]
        if missing:
            return (f"the policy takes cameras {info.camera_names} but cameras.names is {list(self.cameras.names)} "
                    f"(missing {missing})")
        return ""

    def _on_loaded(self, info: PolicyInfo) -> None:
        self.policy_info = info
        self.inference_error = ""  # errors of the policy this one replaces (or of failed loads) no longer apply
        self.get_logger().info(f"policy {info.model_id} ready ({info.load_seconds:.1f} s; horizon {info.horizon} "
                               f"x {info.step_period * 1e3:.1f} ms; cameras {', '.join(info.camera_names)})")
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
    def _hold_reasons(self, now: float) -> dict[str, str]:
        r = {}
        if self.estop:
            r["estop"] = f"e-stop engaged ({self.cfg['estop.topic']} is true)"
        if self.paused:
            r["paused"] = "episode stopped (EpisodeControl STOP); START resumes"
        if self.worker.status != "running":
            r["policy"] = f"policy {self.worker.status}" + (f": {self.worker.load_error}" if self.worker.load_error
                                                             else "")
        stale = self.cameras.stale_by_name(now)
        for name, text in stale.items():
            r[f"camera:{name}"] = text
        for name, text in list(self.camera_errors.items()):
            r[f"camera:{name}"] = text  # a refused frame says more than "stale"
        if not stale and not self.camera_errors:
            sync = self.cameras.newest(now, count=False)
            if not sync.ok:
                r["sync"] = sync.reason
        for name, text in self.states.stale_by_name(now).items():
            r[f"state:{name}"] = text
        for name, text in list(self.state_errors.items()):
            r[f"state:{name}"] = text
        if self.inference_error:
            r["inference"] = self.inference_error
        if self.input_error:
            r["input"] = self.input_error
        if not self.instruction:
            r["instruction"] = f"no instruction yet (publish one on {self.cfg['instruction.topic']})"
        return r

    def _control_tick(self) -> None:
        self.rate.tick(time.monotonic())
        self.cycle.begin()
        now = self.now()
        with self.cycle.section("inputs"):
            reasons = self._hold_reasons(now)
            fallback = self._state_vector(now) if self.safety.last is None else None
            if self.safety.last is None and fallback is None and self.episode_start > 0:
                reasons.setdefault("state:reset", "waiting for an arm state newer than the episode START")
        with self.cycle.section("plan"):
            target, first_use = (None, []) if reasons else self.scheduler.target(now)
        for stamp in first_use:
            self.camera_to_command.add(now - stamp)
        with self.cycle.section("safety"):
            d = self.safety.step(target, reasons, fallback)
        faults = frozenset(d.reasons) - _NOT_FAULTS
        if faults - self._fault_keys:
            # a new fault: chunks planned or in flight from before it must not drive the arms when it clears
            self.epoch += 1
            self.scheduler.clear()
        self._fault_keys = faults
        self.last_decision = d
        if d.command is not None:
            with self.cycle.section("publish"):
                for topic, fields in self.adapter.build(d.command, now):
                    self.command_pubs[topic].publish(fill(self.out_type(), fields))
        self.cycle.end()
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
            if request.instruction:
                self.instruction = request.instruction
            self.episode += 1
            self.episode_start = self.now()
            self.epoch += 1
            self.scheduler.clear()
            self.safety.reset()  # the next command starts from the arm state measured after START
            self.paused = False
            response.success, response.episode_id = True, str(self.episode)
            response.message = f"episode {self.episode} started"
        elif request.command in (EpisodeControl.Request.STOP, EpisodeControl.Request.DISCARD):
            self.paused = True
            self.scheduler.clear()
            response.success, response.episode_id = True, str(self.episode)
            response.message = f"episode {self.episode} stopped: holding"
        else:
            response.success = False
            response.message = f"unknown command {request.command} (START=0, STOP=1, DISCARD=2)"
        self.get_logger().info(response.message)
        return response

    def _apply_parameters(self, params) -> None:
        for p in params:
            self.cfg[p.name] = list(p.value) if isinstance(p.value, (list, tuple)) else p.value
        c = self.cfg
        self.cameras.max_age, self.cameras.slop = c["cameras.max_age"], c["cameras.sync_slop"]
        self.states.max_age = c["arms.state_max_age"]
        self.worker.min_interval = c["policy.min_interval"]
        self.safety.max_step = self.desc.max_velocity / self.rate_hz * c["safety.step_scale"]
        if any(p.name.startswith("control.") for p in params):
            self.scheduler = self._make_scheduler()  # a new plan under the new blending; the old one is dropped
        self.get_logger().info("parameters updated: " + ", ".join(f"{p.name}={p.value}" for p in params))

    # ---------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        now = self.now()
        d = self.last_decision
        name = self.get_fully_qualified_name()
        rate = self.rate.summary()
        cyc = self.cycle.summary()

        def kv(**values):
            return [KeyValue(key=k, value=(f"{v:.6g}" if isinstance(v, float) else str(v))) for k, v in values.items()]

        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        cmd = DiagnosticStatus(name=f"{name}: commands", hardware_id=name)
        if d is None or d.command is None:
            cmd.level, cmd.message = DiagnosticStatus.ERROR, "no command sent: " + (d.why if d else "starting")
        elif d.held:
            cmd.level, cmd.message = DiagnosticStatus.WARN, f"holding: {d.why}"
        else:
            cmd.level, cmd.message = DiagnosticStatus.OK, f"streaming at {rate['rate_hz']:.1f} Hz"
        cmd.values = kv(rate_hz=rate["rate_hz"], expected_hz=self.rate_hz, period_p50_ms=rate["period_p50"] * 1e3,
                        period_p99_ms=rate["period_p99"] * 1e3, period_max_ms=rate["period_max"] * 1e3,
                        period_error_p99_ms=rate["period_error_p99"] * 1e3, overruns=rate["overruns"],
                        ticks=rate["ticks"], held=bool(d and d.held), hold_reasons=",".join(d.reasons) if d else "",
                        held_ticks=self.safety.held_ticks, clipped_ticks=self.safety.clipped_ticks,
                        rate_limited_ticks=self.safety.rate_limited_ticks, body_p99_ms=cyc["body_p99"] * 1e3,
                        slow_ticks=cyc["slow_ticks"], adapter=self.adapter.name, episode=self.episode,
                        scheduling=self.realtime)
        inf = DiagnosticStatus(name=f"{name}: inference", hardware_id=name)
        lat, c2c, o2c = (self.inference_latency.summary(), self.camera_to_command.summary(),
                         self.observation_to_chunk.summary())
        info = self.policy_info
        if self.worker.status != "running":
            inf.level, inf.message = DiagnosticStatus.ERROR, f"policy {self.worker.status} {self.worker.load_error}"
        elif self.inference_error:
            inf.level, inf.message = DiagnosticStatus.ERROR, self.inference_error
        else:
            inf.level = DiagnosticStatus.OK
            inf.message = f"{info.model_id if info else ''}: p50 {lat['p50'] * 1e3:.0f} ms"
        inf.values = kv(model_id=info.model_id if info else "", worker=self.worker.mode,
                        status=self.worker.status, latency_p50_ms=lat["p50"] * 1e3, latency_p99_ms=lat["p99"] * 1e3,
                        latency_max_ms=lat["max"] * 1e3, predictions=self.worker.predictions,
                        failures=self.worker.failures, restarts=self.worker.restarts,
                        chunks_dropped=self.chunks_dropped, camera_to_command_p50_ms=c2c["p50"] * 1e3,
                        camera_to_command_p99_ms=c2c["p99"] * 1e3, observation_to_chunk_p50_ms=o2c["p50"] * 1e3,
                        observation_to_chunk_p99_ms=o2c["p99"] * 1e3, worker_pids=",".join(
                            str(p) for p in self.worker.child_pids))
        arr.status = [cmd, inf]
        stats = self.cameras.stats()
        for cam, age in self.cameras.ages(now).items():
            s = stats[cam]
            st = DiagnosticStatus(name=f"{name}: camera {cam}", hardware_id=cam)
            stale = age is None or age > self.cameras.max_age
            st.level = DiagnosticStatus.WARN if stale else DiagnosticStatus.OK
            st.message = "no frame yet" if age is None else (f"stale ({age * 1e3:.0f} ms)" if stale else "ok")
            st.values = kv(age_ms=(age or 0.0) * 1e3, rate_hz=(1.0 / s["period"]) if s["period"] else 0.0,
                           frames=s["frames"], dropped=s["dropped"], out_of_order=s["out_of_order"],
                           unmatched_sets=self.cameras.unmatched)
            arr.status.append(st)
        for arm, age in self.states.ages(now).items():
            st = DiagnosticStatus(name=f"{name}: arm {arm} state", hardware_id=arm)
            stale = age is None or age > self.states.max_age
            st.level = DiagnosticStatus.WARN if stale else DiagnosticStatus.OK
            st.message = "no state yet" if age is None else (f"stale ({age * 1e3:.0f} ms)" if stale else "ok")
            st.values = kv(age_ms=(age or 0.0) * 1e3)
            arr.status.append(st)
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
            self.get_logger().info("control.realtime_priority is not used with policy.worker thread (GIL priority "
                                   "inversion); use the process worker for real-time scheduling")
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(prio))
            self.realtime = f"SCHED_FIFO {prio}"
        except (AttributeError, PermissionError, OSError) as e:
            self.get_logger().info(f"control thread runs with normal scheduling ({e}); for real-time priority give "
                                   "the process CAP_SYS_NICE or an rtprio limit, or set control.realtime_priority:=0")

    def shutdown(self) -> None:
        self.worker.stop()


class PolicyServices(Node):
    """The policy node's services, served by a helper node in an executor of their own: a reload blocks its caller
    for seconds (load + warm-up), which must delay neither the camera callbacks nor the control timer."""

    def __init__(self, policy: PolicyNode):
        super().__init__(f"{policy.get_name()}_services", namespace=policy.get_namespace())
        self.create_service(ReloadPolicy, policy.resolve_service_name("~/reload_policy"),
                            self._guarded("reload_policy", policy._on_reload))
        self.create_service(EpisodeControl, policy.resolve_service_name("~/episode"),
                            self._guarded("episode", policy._on_episode))

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
        except (ParameterError, AdapterError, ArmDescriptionError, FileNotFoundError) as e:
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
