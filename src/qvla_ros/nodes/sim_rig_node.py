"""The sim rig node: the simulated two-arm rig on the same topics as the real one.

    publishes   cameras.topics (sensor_msgs/Image rgb8, sensor-data QoS, at sim.camera_rate_hz),
                arms.state_topics (sensor_msgs/JointState per arm at sim.control_hz: position, velocity),
                instruction.topic (std_msgs/String, latched: the task's instruction),
                episode.success_topic (std_msgs/Bool, latched: false at START, true once the task succeeded),
                /diagnostics (physics/render timing, commands received)
    subscribes  the command topics of output.adapter (the same arm output the policy node publishes through; the
                per-arm messages of one control tick are applied together)
    services    episode.service (qvla_msgs/EpisodeControl): START resets the scene (seed = sim.seed + number of
                earlier STARTs, or the START's instruction as the task text), STOP / DISCARD report the outcome in
                `message` as JSON: {"episode_id", "seed", "succeeded", "max_reward", "sim_time", "commands"}
    teleop      with sim.teleop true, the scripted teleoperator (qvla_ros.sim.teleop: the transfer-cube expert on the
                MuJoCo rig, a joint sweep on the kinematic one) publishes leader-arm commands at sim.command_hz on
                the command topics through output.adapter (where a Y1 leader arm's joints arrive on the real rig),
                restarting at every START; the rig follows them through its own subscription like any command, so
                recording through the ROS graph takes the robot's code path

Physics runs in wall-clock time: a 50 Hz timer advances the rig to the time since START (catching up after a slow
render, never running ahead). sim.cameras_enabled can switch a camera off at run time (a camera failure).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, String

from qvla_msgs.srv import EpisodeControl
from qvla_ros.control.arm_outputs import ArmOutputError, make_arm_output
from qvla_ros.control.images import rgb_to_image_fields
from qvla_ros.control.messages import MessageError, fill, import_message_type
from qvla_ros.control.params import SIM_RIG_NODE, ParameterError
from qvla_ros.control.timing import RateMonitor
from qvla_ros.nodes import declare_schema, guard_dynamic, qos, run_node

NODE_NAME = "sim_rig"
MAX_CATCH_UP_TICKS = 10  # after a stall, at most this many physics ticks per timer call (then time slips)


def _frame_ids() -> dict[str, str]:
    try:
        from qvla_ros.episodes.topics import load_topic_config

        return {c.name: c.frame_id for c in load_topic_config().cameras}
    except Exception:  # topics.yaml is optional for the node: frame ids then default to the camera names
        return {}


class SimRigNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = declare_schema(self, SIM_RIG_NODE, SIM_RIG_NODE.defaults())
        c = self.cfg
        self.arm_names = list(c["arms.names"])
        self.joint_names = list(c["arms.joint_names"])
        self.camera_names = list(c["cameras.names"])
        self.arm_output = make_arm_output(c["output.adapter"], self.arm_names, self.joint_names, c["output.topics"])
        self.rig = self._make_rig()
        self.lock = threading.Lock()  # the rig is not thread-safe: physics, rendering, commands, resets
        self.frame_ids = _frame_ids()
        self.episode = 0
        self.seed = c["sim.seed"]
        self.instruction = self.rig.instruction
        self.wall_start = time.monotonic()
        self.pending: dict[str, np.ndarray] = {}
        self.command = None
        self.commands = 0
        self.bad_commands = 0
        self.success = False
        self.camera_rate = RateMonitor(c["sim.camera_rate_hz"])

        self.cam_pubs = [self.create_publisher(Image, t, qos("sensor_data")) for t in c["cameras.topics"]]
        self.state_pubs = [self.create_publisher(JointState, t, qos("sensor_data")) for t in c["arms.state_topics"]]
        self.instruction_pub = self.create_publisher(String, c["instruction.topic"], qos("transient_local"))
        self.success_pub = self.create_publisher(Bool, c["episode.success_topic"], qos("transient_local"))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos("reliable"))
        cmd_type = import_message_type(self.arm_output.msg_type)
        for o in self.arm_output.arm_topics:
            self.create_subscription(cmd_type, o.topic, lambda m, a=o.arm: self._on_command(a, m), qos("reliable"))
        self.create_service(EpisodeControl, c["episode.service"], self._on_episode)
        self.add_on_set_parameters_callback(guard_dynamic(SIM_RIG_NODE, self.cfg))
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.create_timer(1.0 / c["sim.control_hz"], self._physics_tick)
        self.teleop = None
        self.teleop_pubs = {}
        if c["sim.teleop"]:
            from qvla_ros.sim.teleop import make_teleop

            try:
                self.teleop = make_teleop(self.rig)
            except ValueError as e:  # no scripted teleoperator for this task
                raise ParameterError(f"parameter sim.teleop: {e}") from None
            self.teleop_pubs = {
                o.topic: self.create_publisher(cmd_type, o.topic, qos("reliable")) for o in self.arm_output.arm_topics
            }
            self.teleop_type = cmd_type
            self.create_timer(1.0 / c["sim.command_hz"], self._teleop_tick)
        self.create_timer(1.0, self._diagnostics)
        # Cameras render in one thread of their own, which also runs the resets (SimRig.reset renders): an OpenGL
        # (EGL) context is current in one thread only, and an executor runs callbacks on whichever thread is free.
        self._stop = threading.Event()
        self._resets: queue.Queue = queue.Queue()
        self._camera_thread = threading.Thread(target=self._camera_loop, name="sim-cameras", daemon=True)
        self._camera_thread.start()
        self._reset()
        self.get_logger().info(
            f"{c['sim.backend']} rig, task {c['sim.task']}, cameras {', '.join(self.camera_names)} "
            f"{c['sim.image_width']}x{c['sim.image_height']} @ {c['sim.camera_rate_hz']:.0f} Hz, "
            f"commands via {self.arm_output.name} on {', '.join(o.topic for o in self.arm_output.arm_topics)}"
        )

    def _make_rig(self):
        c = self.cfg
        kw = dict(
            task=c["sim.task"],
            image_size=(c["sim.image_height"], c["sim.image_width"]),
            camera_names=tuple(self.camera_names),
            control_hz=c["sim.control_hz"],
            command_hz=c["sim.command_hz"],
            seed=c["sim.seed"],
        )
        if c["sim.backend"] == "kinematic":
            from qvla_ros.sim.kinematic_rig import KinematicRig

            return KinematicRig(**kw)
        from qvla_ros.sim.rig import SimRig

        return SimRig(**kw)

    def _reset(self, instruction: str = "", timeout: float = 30.0) -> int:
        """Reset in the camera thread and wait for it."""
        done = threading.Event()
        result: dict = {}
        self._resets.put((instruction, done, result))
        if not done.wait(timeout):
            raise RuntimeError(f"the rig did not reset within {timeout:.0f} s")
        if "error" in result:
            raise RuntimeError(result["error"])
        return result["seed"]

    def _do_reset(self, instruction: str) -> int:
        seed = self.cfg["sim.seed"] + self.episode
        with self.lock:
            self.rig.reset(seed=seed)
            if self.teleop is not None:
                self.teleop.reset(self.rig)
            self.wall_start = time.monotonic()
            self.pending.clear()
            self.command = None
            self.commands = 0
            self.success = False
        self.instruction = instruction or self.rig.instruction
        self.instruction_pub.publish(String(data=self.instruction))
        self.success_pub.publish(Bool(data=False))
        return seed

    # ---------------------------------------------------------------- commands in
    def _on_command(self, arm: str, msg) -> None:
        try:
            q7 = self.arm_output.parse(msg, arm)
        except MessageError as e:
            self.bad_commands += 1
            self.get_logger().error(f"ignored a command: {e}", throttle_duration_sec=2.0)
            return
        if not np.all(np.isfinite(q7)):
            self.bad_commands += 1
            self.get_logger().error(f"ignored a non-finite command for {arm}", throttle_duration_sec=2.0)
            return
        with self.lock:
            # the arms' messages of one control tick are applied together: when every arm has sent one, or when
            # an arm sends again before the others (a single-arm publisher)
            if arm in self.pending:
                self._apply_pending()
            self.pending[arm] = q7
            if len(self.pending) == len(self.arm_names):
                self._apply_pending()

    def _apply_pending(self) -> None:
        q = self.rig.observe(render=False).qpos if self.command is None else self.command.copy()
        for i, arm in enumerate(self.arm_names):
            if arm in self.pending:
                q[i * 7 : (i + 1) * 7] = self.pending[arm]
        self.pending.clear()
        self.command = self.rig.command(q)
        self.commands += 1

    # ---------------------------------------------------------------- physics, states, cameras
    def _physics_tick(self) -> None:
        with self.lock:
            target = time.monotonic() - self.wall_start
            behind = target - self.rig.time
            if behind > MAX_CATCH_UP_TICKS * self.rig.dt:
                self.wall_start += behind - MAX_CATCH_UP_TICKS * self.rig.dt  # let sim time slip after a stall
                target = time.monotonic() - self.wall_start
            self.rig.step_to(target)
            obs = self.rig.observe(render=False)
            succeeded = bool(self.rig.episode_success)
        stamp = self.get_clock().now().to_msg()
        for i, pub in enumerate(self.state_pubs):
            msg = JointState()
            msg.header.stamp = stamp
            msg.name = self.joint_names[i * 7 : (i + 1) * 7]
            msg.position = obs.qpos[i * 7 : (i + 1) * 7].tolist()
            msg.velocity = obs.qvel[i * 7 : (i + 1) * 7].tolist()
            pub.publish(msg)
        if succeeded and not self.success:
            self.success = True
            self.success_pub.publish(Bool(data=True))
            self.get_logger().info(f"episode {self.episode} succeeded at sim time {obs.time:.2f} s")

    def _teleop_tick(self) -> None:
        with self.lock:
            q = np.asarray(self.teleop.act(self.rig, self.rig.time), dtype=np.float64)
        now = self.get_clock().now().nanoseconds * 1e-9
        for topic, fields in self.arm_output.build(q, now):
            self.teleop_pubs[topic].publish(fill(self.teleop_type(), fields))

    def _camera_loop(self) -> None:
        period = 1.0 / self.cfg["sim.camera_rate_hz"]
        next_t = time.monotonic()
        while not self._stop.is_set():
            next_t += period
            while not self._resets.empty():
                instruction, done, result = self._resets.get()
                try:
                    result["seed"] = self._do_reset(instruction)
                except Exception as e:
                    result["error"] = f"reset failed: {e}"
                done.set()
            try:
                self._camera_tick()
            except Exception as e:  # keep the other cameras and the physics alive; say what broke
                self.get_logger().error(f"camera frame failed: {e}", throttle_duration_sec=2.0)
            delay = next_t - time.monotonic()
            if delay < -period:
                next_t = time.monotonic()  # fell more than a frame behind (slow render): skip, do not burst
            elif delay > 0:
                self._stop.wait(delay)
        with self.lock:
            try:
                self.rig.close()  # in the thread that owns the GL context
            except Exception as e:
                self.get_logger().warning(f"closing the rig: {e}")

    def _camera_tick(self) -> None:
        enabled = self.cfg["sim.cameras_enabled"]
        if not any(enabled):
            return
        with self.lock:
            obs = self.rig.observe(render=True)
        stamp = self.get_clock().now().to_msg()
        self.camera_rate.tick(time.monotonic())
        for name, pub, on in zip(self.camera_names, self.cam_pubs, enabled):
            if not on:
                continue
            msg = fill(Image(), rgb_to_image_fields(obs.images[name]))
            msg.header.stamp = stamp
            msg.header.frame_id = self.frame_ids.get(name, name)
            pub.publish(msg)

    # ---------------------------------------------------------------- episodes and parameters
    def _on_episode(self, request, response):
        if request.command == EpisodeControl.Request.START:
            try:
                seed = self._reset(request.instruction)
            except RuntimeError as e:
                response.success, response.message = False, str(e)
                return response
            self.episode += 1
            response.success = True
            response.episode_id = f"{self.cfg['sim.task']}-{seed}"
            response.message = f"reset with seed {seed}: {self.instruction}"
        elif request.command in (EpisodeControl.Request.STOP, EpisodeControl.Request.DISCARD):
            with self.lock:
                seed = self.rig.seed
                outcome = {
                    "episode_id": f"{self.cfg['sim.task']}-{seed}",
                    "seed": seed,
                    "succeeded": bool(self.rig.episode_success),
                    "max_reward": int(self.rig.max_reward_reached),
                    "sim_time": float(self.rig.time),
                    "commands": self.commands,
                }
            response.success = True
            response.episode_id = outcome["episode_id"]
            response.message = json.dumps(outcome)
        else:
            response.success = False
            response.message = f"unknown command {request.command} (START=0, STOP=1, DISCARD=2)"
        self.get_logger().info(f"episode {request.command}: {response.message}")
        return response

    def _apply_parameters(self, params) -> None:
        for p in params:
            self.cfg[p.name] = list(p.value) if isinstance(p.value, (list, tuple)) else p.value
            self.get_logger().warning(f"{p.name} = {self.cfg[p.name]}")

    def _diagnostics(self) -> None:
        name = self.get_fully_qualified_name()
        st = DiagnosticStatus(
            name=f"{name}: rig",
            hardware_id=name,
            level=DiagnosticStatus.OK,
            message=f"episode {self.episode}, sim time {self.rig.time:.1f} s",
        )
        timing = self.rig.timing()
        values = {
            "camera_rate_hz": self.camera_rate.rate(),
            "commands": self.commands,
            "bad_commands": self.bad_commands,
            "succeeded": self.success,
            "cameras_enabled": ",".join(str(x).lower() for x in self.cfg["sim.cameras_enabled"]),
        }
        if timing is not None:
            values.update(
                step_ms_p95=timing.step_ms.get("p95", 0.0),
                render_ms_p95=timing.render_ms.get("p95", 0.0),
                stale_command_ticks=timing.stale_ticks,
            )
        if not all(self.cfg["sim.cameras_enabled"]):
            st.level, st.message = DiagnosticStatus.WARN, "a camera is switched off (sim.cameras_enabled)"
        st.values = [KeyValue(key=k, value=(f"{v:.4g}" if isinstance(v, float) else str(v))) for k, v in values.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(arr)

    def shutdown(self) -> None:
        self._stop.set()
        self._camera_thread.join(timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    # callbacks are short (rendering has a thread of its own); the rig's own errors (no GL backend, unknown task)
    # say what to do, and its module is imported only when the node starts: recognized by name
    return run_node(
        NODE_NAME,
        SimRigNode,
        (ParameterError, ArmOutputError, MessageError, FileNotFoundError),
        SingleThreadedExecutor,
        is_startup_error=lambda e: type(e).__name__ == "RigError",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
