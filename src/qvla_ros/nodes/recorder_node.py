"""The recorder node: teleoperated demonstrations -> one episode (rosbag2 + MCAP) per demonstration, in a dataset
directory, from the raw serialized messages (no deserialization on the way to the disk).

    subscribes  every topic of config/topics.yaml (recorder.topics_file) except the episode metadata, which it
                writes itself: three cameras (recorder.camera_qos, sensor-data by default), both arms' measured
                states and commands (the leader arms in teleoperation), the instruction (latched), the episode
                success flag; `raw=True`: the CDR bytes go to qvla_ros.episodes.recorder.DatasetRecorder as they are
    services    ~/episode (qvla_msgs/EpisodeControl): START [instruction], STOP [outcome], DISCARD; the response's
                `message` is JSON (path, duration, messages, drops)
    publishes   ~/status (std_msgs/String, JSON): the live status (episode, duration, per-topic rates, drops,
                bytes, the per-topic counts already flushed to the OS) every recorder.status_period and after each
                flush
    calls       recorder.rig_service (qvla_msgs/EpisodeControl) when an episode starts (START: reset the scene) and
                ends (STOP: the rig's outcome, e.g. the simulated task's success)

A person at the robot runs it in a terminal (`qvla-recorder-node --ros-args -p recorder.dataset:=DIR`) and uses the
keys of lerobot-record: right arrow ends the episode and keeps it, left arrow discards it and records it again, Esc
stops recording. With recorder.auto_start, episodes follow each other (recorder.episode_time, then a reset phase of
recorder.reset_time) until recorder.num_episodes are kept. What happens on a crash, at a full disk, and with an
interrupted episode found at start: see qvla_ros.episodes.recorder.

Threads: the subscriptions run in one executor and only queue bytes; the services, the timers, the rig calls and the
keys run beside it (a helper node in a second executor thread, and the key reader's thread), so that closing an
episode never delays a camera callback; the writer thread compresses and writes.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import rclpy
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String

from qvla_msgs.srv import EpisodeControl
from qvla_ros.control.messages import MessageError, import_message_type
from qvla_ros.control.params import RECORDER_NODE, ParameterError
from qvla_ros.episodes.recorder import DatasetRecorder, RecorderError, SequenceTracker
from qvla_ros.episodes.topics import TopicConfigError, load_topic_config
from qvla_ros.nodes import declare_schema, fail, qos, spin

NODE_NAME = "recorder"


class RecorderNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = declare_schema(self, RECORDER_NODE, RECORDER_NODE.defaults())
        c = self.cfg
        if not c["recorder.dataset"]:
            raise ParameterError(
                "parameter recorder.dataset is empty: give the dataset directory to record into "
                "(-p recorder.dataset:=DIR, or dataset:=DIR with qvla-bringup --launch record)"
            )
        self.topics = load_topic_config(c["recorder.topics_file"] or None)
        meta = {k: c[f"recorder.{k}"] for k in ("task", "rig", "teleoperator") if c[f"recorder.{k}"]}
        meta["topics"] = {t: {"type": ty} for t, ty in self.topics.all_topics().items()}
        self.recorder = DatasetRecorder(
            c["recorder.dataset"],
            self.topics,
            metadata=meta,
            compress=c["recorder.compress"],
            flush_every_s=c["recorder.flush_period"],
            fsync=c["recorder.fsync"],
            min_free_bytes=int(c["recorder.min_free_gb"] * 1e9),
            max_queue_bytes=int(c["recorder.max_queue_mb"] * 1e6),
            recover=c["recorder.recover"],
            on_flush=self._on_flush,
        )
        self.recorder.open()  # RecorderError: disk margin, unwritable directory
        for entry in self.recorder.recovered:
            self.get_logger().warning(entry["message"])
        self.sequences = SequenceTracker()
        self.instruction_cdr: bytes | None = None
        self.status_pub = self.create_publisher(String, "~/status", qos("reliable"))
        self.short = {c.topic: c.name for c in self.topics.cameras}
        for a in self.topics.arms:
            self.short[a.state.topic] = f"{a.name}_state"
            self.short[a.command.topic] = f"{a.name}_cmd"
        self.short[self.topics.instruction.topic] = "instruction"
        self.short[self.topics.success.topic] = "success"

        cameras = {cam.topic for cam in self.topics.cameras}
        qos_of = {cam.topic: cam.qos for cam in self.topics.cameras}
        for a in self.topics.arms:
            qos_of[a.state.topic], qos_of[a.command.topic] = a.state.qos, a.command.qos
        qos_of[self.topics.instruction.topic] = self.topics.instruction.qos
        qos_of[self.topics.success.topic] = self.topics.success.qos
        self.subscribed = []
        for topic, type_name in self.topics.all_topics().items():
            if topic == self.topics.metadata.topic:
                continue  # the recorder writes the episode metadata itself
            msg_type = import_message_type(type_name)
            profile = qos(
                c["recorder.camera_qos"] if topic in cameras else qos_of[topic], depth=10 if topic in cameras else 50
            )
            events = SubscriptionEventCallbacks(
                message_lost=lambda info, t=topic: self.recorder.count_lost(
                    t, int(info.total_count_change), "middleware"
                )
            )
            self.create_subscription(
                msg_type,
                topic,
                lambda data, info, t=topic: self._on_message(t, data, info),
                profile,
                raw=True,
                event_callbacks=events,
            )
            self.subscribed.append(topic)

        # ---- control: episodes, the reset phase, keys (see Control)
        self.finished = threading.Event()
        self.get_logger().info(
            f"recording {len(self.subscribed)} topics of {self.topics.source} into {c['recorder.dataset']} "
            f"(next episode {self.recorder.next_index}; "
            + (
                "auto: "
                + (
                    f"{c['recorder.episode_time']:g} s episodes, {c['recorder.reset_time']:g} s reset"
                    if c["recorder.episode_time"]
                    else "until stopped"
                )
                if c["recorder.auto_start"]
                else "waiting for EpisodeControl START on ~/episode"
            )
            + ")"
        )

    # ---------------------------------------------------------------- the hot path
    def _on_message(self, topic: str, data: bytes, info) -> None:
        stamp = info.get("received_timestamp") or time.time_ns()
        gap = self.sequences.gap(
            topic, bytes(info.get("publisher_gid", {}).get("data", b"")), info.get("publication_sequence_number")
        )
        if topic == self.topics.instruction.topic:
            self.instruction_cdr = data
        if not self.recorder.recording:
            return
        if gap:
            self.recorder.count_lost(topic, gap, "sequence_gap")
        self.recorder.put(topic, stamp, data)

    def _on_flush(self, flushed: dict) -> None:  # the writer thread
        self.publish_status(flushed)

    def publish_status(self, flushed: dict | None = None, state: str = "") -> dict:
        s = self.recorder.status()
        s = {
            "state": state or ("recording" if s else "idle"),
            "next_episode": self.recorder.next_index,
            "kept": self.recorder.kept,
            "discarded": self.recorder.discarded,
            **s,
            "flushed": flushed if flushed is not None else self.recorder.flushed_counts(),
        }
        if self.context.ok():
            try:
                self.status_pub.publish(String(data=json.dumps(s, default=str)))
            except Exception:  # shutting down
                pass
        return s

    def shutdown(self) -> None:
        self.recorder.close()


class Control(Node):
    """The recorder's services, timers, rig calls and keys, in an executor of their own (see the module docstring):
    one lock serializes starting and ending episodes, whoever asks (service, key, timer)."""

    def __init__(self, rec: RecorderNode):
        super().__init__(f"{rec.get_name()}_control", namespace=rec.get_namespace())
        self.rec = rec
        self.cfg = rec.cfg
        self.lock = threading.RLock()
        self.phase = "idle"  # idle | recording | reset | done
        self.phase_since = time.monotonic()
        self.episode_started = 0.0
        self.create_service(EpisodeControl, rec.resolve_service_name("~/episode"), self._on_episode)
        # the client lives on the subscriptions' node: its executor delivers the answer while this one waits
        self.rig = None
        if self.cfg["recorder.rig_service"]:
            self.rig = rec.create_client(EpisodeControl, self.cfg["recorder.rig_service"])
        self.create_timer(0.05, self._tick)
        if self.cfg["recorder.status_period"] > 0:
            self.create_timer(self.cfg["recorder.status_period"], self._status_line)
        self.tty_out = sys.stdout.isatty()
        self.keys = None
        if self.cfg["recorder.keyboard"]:
            from qvla_ros.episodes.keys import TerminalKeys

            self.keys = TerminalKeys(self._on_key)
            if self.keys.active:
                self.keys.start()
                self.get_logger().info(
                    "keys: right arrow = end the episode and keep it, left arrow = discard and "
                    "record again, Esc = stop recording"
                )
        if self.cfg["recorder.auto_start"]:
            self.phase, self.phase_since = "reset", time.monotonic() - self.cfg["recorder.reset_time"]

    # ---------------------------------------------------------------- episodes
    def _call_rig(self, command: int, instruction: str = "", timeout: float = 30.0):
        if self.rig is None:
            return None
        if not self.rig.wait_for_service(timeout_sec=min(timeout, 10.0)):
            raise RecorderError(
                f"the rig's episode service {self.cfg['recorder.rig_service']} is not available "
                "(is the rig running? recorder.rig_service)"
            )
        done = threading.Event()
        fut = self.rig.call_async(EpisodeControl.Request(command=command, instruction=instruction))
        fut.add_done_callback(lambda f: done.set())
        if not done.wait(timeout):
            raise RecorderError(
                f"the rig's episode service {self.cfg['recorder.rig_service']} did not answer within {timeout:.0f} s"
            )
        return fut.result()

    def start_episode(self, instruction: str = "") -> int:
        with self.lock:
            if self.rec.recorder.recording:
                raise RecorderError(
                    f"episode {self.rec.recorder.status().get('episode')} is recording: stop or discard it first"
                )
            extra = {}
            res = self._call_rig(EpisodeControl.Request.START, instruction)
            if res is not None:
                if not res.success:
                    raise RecorderError(f"the rig refused START: {res.message}")
                extra["rig_episode"] = {"episode_id": res.episode_id, "message": res.message}
                time.sleep(0.1)  # let the rig's fresh state and latched instruction arrive before recording
            text = instruction or self.cfg["recorder.instruction"]
            if not text and self.rec.instruction_cdr is None:
                self.get_logger().warning(
                    f"no instruction received on {self.rec.topics.instruction.topic} yet: the episode will have none "
                    "(training and calibration need one); set recorder.instruction or give one with START",
                    throttle_duration_sec=30.0,
                )
            index = self.rec.recorder.start(
                instruction=text, metadata=extra, instruction_cdr=None if text else self.rec.instruction_cdr
            )
            self.phase, self.phase_since = "recording", time.monotonic()
            self.episode_started = time.monotonic()
            self.get_logger().info(f"episode {index} recording" + (f" ({res.episode_id})" if res else ""))
            return index

    def end_episode(
        self, keep: bool, outcome: int = EpisodeControl.Request.OUTCOME_UNSPECIFIED, reason: str = ""
    ) -> dict:
        with self.lock:
            if not self.rec.recorder.recording:
                raise RecorderError("no episode is recording")
            self.rec.recorder.cut()  # the episode ends now, not after the rig has answered
            success = {EpisodeControl.Request.OUTCOME_SUCCESS: True, EpisodeControl.Request.OUTCOME_FAILURE: False}.get(
                outcome
            )
            extra = {}
            if self.rig is not None:
                try:
                    res = self._call_rig(EpisodeControl.Request.STOP if keep else EpisodeControl.Request.DISCARD)
                    rig_outcome = json.loads(res.message) if res is not None and res.message.startswith("{") else {}
                    extra["rig_outcome"] = rig_outcome
                    if success is None and "succeeded" in rig_outcome:
                        success = bool(rig_outcome["succeeded"])
                    if "seed" in rig_outcome:
                        extra["seed"] = rig_outcome["seed"]
                except RecorderError as e:
                    self.get_logger().warning(f"no outcome from the rig: {e}")
            info = (
                self.rec.recorder.stop(success=success, metadata=extra, reason=reason)
                if keep
                else self.rec.recorder.discard()
            )
            self.phase, self.phase_since = "reset", time.monotonic()
            self.get_logger().info(
                f"episode {info.index} {info.outcome}"
                + (f" -> {info.path}" if info.path else "")
                + f": {info.duration_s:.1f} s, {info.messages} messages, {info.file_bytes / 1e6:.1f} MB, "
                f"{info.dropped} dropped"
                + (f", success={info.success}" if keep else "")
                + (f" ({reason})" if reason else "")
            )
            self.rec.publish_status(state="reset")
            return info.as_dict()

    def finish(self, why: str) -> None:
        with self.lock:
            if self.rec.recorder.recording:
                self.end_episode(True, reason=why)
            if self.phase != "done":
                self.phase = "done"
                self.get_logger().info(
                    f"recording stopped ({why}): {self.rec.recorder.kept} episode(s) kept, "
                    f"{self.rec.recorder.discarded} discarded in {self.cfg['recorder.dataset']}"
                )
                self.rec.publish_status(state="done")
                if self.cfg["recorder.exit_when_done"]:
                    self.rec.finished.set()

    # ---------------------------------------------------------------- triggers
    def _on_episode(self, request, response):
        try:
            if request.command == EpisodeControl.Request.START:
                if self.phase == "done":
                    self.phase = "idle"
                index = self.start_episode(request.instruction)
                response.success, response.episode_id = True, f"episode_{index:06d}"
                response.message = json.dumps({"episode": index, "state": "recording"})
            elif request.command in (EpisodeControl.Request.STOP, EpisodeControl.Request.DISCARD):
                info = self.end_episode(request.command == EpisodeControl.Request.STOP, request.outcome)
                response.success, response.episode_id = True, f"episode_{info['episode']:06d}"
                response.message = json.dumps(
                    {k: v for k, v in info.items() if k != "topics"}
                    | {"dropped_by_topic": {t: v["dropped"] for t, v in info["topics"].items()}}
                )
            else:
                response.success = False
                response.message = f"unknown command {request.command} (START=0, STOP=1, DISCARD=2)"
        except RecorderError as e:
            response.success, response.message = False, str(e)
        except Exception as e:  # never let a bug kill the service thread: answer, log
            response.success, response.message = False, f"{type(e).__name__}: {e}"
            self.get_logger().error(response.message)
        return response

    def _on_key(self, key: str) -> None:  # the key reader's thread
        try:
            if key == "right" and self.rec.recorder.recording:
                self.end_episode(True, reason="kept (right arrow)")
            elif key == "left" and self.rec.recorder.recording:
                self.end_episode(False)
                self.get_logger().info("discarded: recording that episode again after the reset phase")
            elif key == "esc":
                self.finish("Esc pressed")
        except RecorderError as e:
            self.get_logger().error(str(e))

    def _tick(self) -> None:
        c = self.cfg
        now = time.monotonic()
        try:
            why = self.rec.recorder.disk_low()
            if self.rec.recorder.recording and why:
                self.end_episode(True, reason=why)
                self.finish(why)
                return
            if self.rec.recorder.writer_error and self.phase != "done":
                self.get_logger().error(f"the writer failed: {self.rec.recorder.writer_error}")
                self.finish("writer failed")
                return
            if (
                self.phase == "recording"
                and c["recorder.episode_time"] > 0
                and now - self.episode_started >= c["recorder.episode_time"]
            ):
                self.end_episode(True, reason=f"episode_time {c['recorder.episode_time']:g} s reached")
                if c["recorder.num_episodes"] and self.rec.recorder.kept >= c["recorder.num_episodes"]:
                    self.finish(f"{c['recorder.num_episodes']} episodes kept")
                elif not c["recorder.auto_start"]:
                    self.phase = "idle"
            elif (
                self.phase == "reset"
                and c["recorder.auto_start"]
                and now - self.phase_since >= c["recorder.reset_time"]
            ):
                if c["recorder.num_episodes"] and self.rec.recorder.kept >= c["recorder.num_episodes"]:
                    self.finish(f"{c['recorder.num_episodes']} episodes kept")
                else:
                    self.start_episode()
        except RecorderError as e:
            self.get_logger().error(str(e), throttle_duration_sec=5.0)
            if self.phase == "reset":
                self.phase_since = now  # try again after another reset phase

    def _status_line(self) -> None:
        names = self.rec.short
        line = self.rec.recorder.status_line(names)
        if self.phase == "reset" and not self.rec.recorder.recording:
            left = max(0.0, self.cfg["recorder.reset_time"] - (time.monotonic() - self.phase_since))
            line = f"reset phase ({left:.0f} s left) | " + line
        self.rec.publish_status(state=self.phase)
        if self.tty_out:
            print("\r\033[K" + line, end="", flush=True)
        else:
            self.get_logger().info(line)

    def shutdown(self) -> None:
        if self.keys is not None:
            self.keys.stop()
        if self.tty_out:
            print(flush=True)


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv)
    node = control = None
    try:
        try:
            node = RecorderNode()
        except (ParameterError, RecorderError, TopicConfigError, MessageError, OSError) as e:
            return fail(NODE_NAME, e)
        control = Control(node)
        control_executor = SingleThreadedExecutor()
        control_executor.add_node(control)
        control_thread = threading.Thread(
            target=spin, args=(control_executor,), name="qvla-recorder-control", daemon=True
        )
        control_thread.start()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            while rclpy.ok() and not node.finished.is_set():
                executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        control_executor.shutdown(timeout_sec=5.0)
        control_thread.join(timeout=5.0)
    finally:
        if control is not None:
            control.shutdown()
        if node is not None:
            node.shutdown()  # an episode still recording is kept, marked as stopped by the shutdown
        for n in (control, node):
            if n is not None:
                n.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
