"""Parameter schemas of the policy, sim rig and monitor nodes: declared once, typed, described, validated
(in the spirit of generate_parameter_library's YAML schemas). Defaults live in config/bimanual.yaml, a standard
ROS 2 parameter file: a `/**` block shared by every qvla node (topics, names, the arm output) and one block per
node. The nodes declare every parameter from these specs with its type, description and range; the launch-free
runner and the tests validate the same file without ROS.

    schema = POLICY_NODE
    values = schema.defaults()             # from config/bimanual.yaml
    values = schema.validate({**values, "control.rate_hz": 30.0})   # ParameterError naming the parameter
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qvla_ros.control.arm_outputs import ARM_OUTPUTS
from qvla_ros.control.scheduler import BLENDING_MODES

PARAMS_FILE = "bimanual.yaml"
SHARED_KEY = "/**"
TYPES = ("string", "integer", "double", "bool", "string_array", "double_array", "bool_array")


class ParameterError(ValueError):
    """A parameter value is invalid; the message names the parameter and says what to do."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # one of TYPES
    description: str
    range: tuple[float, float] | None = None  # inclusive, for integer/double (and each element of double_array)
    choices: tuple[str, ...] = ()  # for string (and each element of string_array)
    length: int | None = None  # exact array length
    min_length: int = 0
    dynamic: bool = False  # may change while the node runs
    allow_empty: bool = True  # for strings

    def check(self, value: Any) -> Any:
        """The value converted to the declared type; ParameterError when it cannot be."""
        t = self.type
        try:
            if t == "string":
                v = str(value) if isinstance(value, str) else _bad(value)
                if not self.allow_empty and not v:
                    raise ParameterError(f"parameter {self.name} must not be empty: {self.description}")
            elif t == "integer":
                v = int(value) if isinstance(value, int) and not isinstance(value, bool) else _bad(value)
            elif t == "double":
                v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _bad(value)
            elif t == "bool":
                v = bool(value) if isinstance(value, bool) else _bad(value)
            elif t == "string_array":
                v = [x if isinstance(x, str) else _bad(x) for x in _seq(value)]
            elif t == "double_array":
                v = [
                    float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else _bad(x)
                    for x in _seq(value)
                ]
            elif t == "bool_array":
                v = [x if isinstance(x, bool) else _bad(x) for x in _seq(value)]
            else:  # pragma: no cover - schema bug
                raise AssertionError(t)
        except _BadType:
            raise ParameterError(
                f"parameter {self.name} must be of type {t}, got {value!r} ({type(value).__name__}): {self.description}"
            ) from None
        items = v if isinstance(v, list) else [v]
        if self.range is not None and t in ("integer", "double", "double_array"):
            lo, hi = self.range
            for x in items:
                if not lo <= x <= hi:
                    raise ParameterError(
                        f"parameter {self.name} = {value!r} is outside [{lo}, {hi}]: {self.description}"
                    )
        if self.choices and t in ("string", "string_array"):
            for x in items:
                if x not in self.choices:
                    raise ParameterError(
                        f"parameter {self.name} = {x!r} is not one of {', '.join(self.choices)}: {self.description}"
                    )
        if isinstance(v, list):
            if self.length is not None and len(v) != self.length:
                raise ParameterError(
                    f"parameter {self.name} needs exactly {self.length} entries, got {len(v)}: {self.description}"
                )
            if len(v) < self.min_length:
                raise ParameterError(
                    f"parameter {self.name} needs at least {self.min_length} entries, got {len(v)}: {self.description}"
                )
        return v


class _BadType(Exception):
    pass


def _bad(value):
    raise _BadType()


def _seq(value):
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise _BadType()
    return list(value)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (ROS parameter names are the YAML paths joined by dots)."""
    out = {}
    for k, v in (tree or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def default_params_file() -> Path:
    from qvla_ros.paths import config_path

    return config_path(PARAMS_FILE)


def read_params_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A ROS 2 parameter file -> {node key: flat parameters}: '/**' for the shared block, else the node name."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ParameterError(f"parameter file {p} does not exist") from None
    except yaml.YAMLError as e:
        raise ParameterError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{p}: expected `<node>: {{ros__parameters: {{...}}}}` blocks at the top level")
    out = {}
    for node, block in data.items():
        if not isinstance(block, dict) or "ros__parameters" not in block:
            raise ParameterError(f"{p}: block {node!r} has no ros__parameters")
        out[node_key(str(node))] = flatten(block["ros__parameters"])
    return out


def node_key(key: str) -> str:
    """'/**/policy_node', '/policy_node' and 'policy_node' all name the node policy_node ('/**' stays)."""
    if key == SHARED_KEY:
        return key
    for prefix in ("/**/", "/"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


@dataclass(frozen=True)
class Schema:
    node: str  # the node's key in the parameter file (its default node name)
    specs: tuple[ParamSpec, ...]

    def spec(self, name: str) -> ParamSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise ParameterError(f"{self.node} has no parameter {name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def defaults(self, path: str | Path | None = None) -> dict[str, Any]:
        """The node's parameters from the file (shared block, then the node's own block), validated; every
        parameter of the schema must be there, and the node's own block may hold nothing unknown."""
        path = Path(path) if path is not None else default_params_file()
        blocks = read_params_file(path)
        own = blocks.get(self.node, {})
        unknown = [k for k in own if k not in self.names]
        if unknown:
            raise ParameterError(
                f"{path}: {self.node} has unknown parameter(s) {', '.join(unknown)} (known: {', '.join(self.names)})"
            )
        merged = {k: v for k, v in blocks.get(SHARED_KEY, {}).items() if k in self.names}
        merged.update(own)
        missing = [n for n in self.names if n not in merged]
        if missing:
            raise ParameterError(f"{path}: no default for {self.node} parameter(s) {', '.join(missing)}")
        return self.validate(merged, source=str(path))

    def validate(self, values: dict[str, Any], source: str = "") -> dict[str, Any]:
        where = f"{source}: " if source else ""
        out = {}
        for s in self.specs:
            if s.name not in values:
                raise ParameterError(f"{where}parameter {s.name} is not set: {s.description}")
            try:
                out[s.name] = s.check(values[s.name])
            except ParameterError as e:
                raise ParameterError(f"{where}{e}") from None
        for check in _CROSS_CHECKS.get(self.node, ()):
            msg = check(out)
            if msg:
                raise ParameterError(f"{where}{msg}")
        return out


# ---------------------------------------------------------------- the shared block (every qvla node on the rig)
_SHARED = (
    ParamSpec(
        "cameras.names",
        "string_array",
        "camera names, in the order the policy takes its images (must equal the policy's camera_names)",
        min_length=1,
    ),
    ParamSpec(
        "cameras.topics",
        "string_array",
        "one image topic per camera, same order as cameras.names "
        "(sensor_msgs/Image; with cameras.transport compressed, the CompressedImage topic)",
        min_length=1,
    ),
    ParamSpec("arms.names", "string_array", "arm names in command-vector order (left first, then right)", length=2),
    ParamSpec(
        "arms.joint_names",
        "string_array",
        "the 14 command/state vector entries in order: left arm "
        "joint1..6 + gripper, then right arm (config/topics.yaml)",
        length=14,
    ),
    ParamSpec(
        "arms.state_topics",
        "string_array",
        "sensor_msgs/JointState topic of each arm's measured joints, same order as arms.names",
        length=2,
    ),
    ParamSpec(
        "instruction.topic", "string", "std_msgs/String topic with the task instruction (latched)", allow_empty=False
    ),
    ParamSpec(
        "output.adapter",
        "string",
        "arm command interface: joint_state (sensor_msgs/JointState per arm), "
        "forward_command (std_msgs/Float64MultiArray for a ros2_control forward_command_controller), "
        "joint_trajectory (trajectory_msgs/JointTrajectory), y1 (the IMETA vendor driver's "
        "y1_msg/ArmJointPositionControl; needs y1_msg)",
        choices=ARM_OUTPUTS,
    ),
    ParamSpec(
        "output.topics",
        "string_array",
        "command topic per arm (same order as arms.names); '' takes the adapter's default",
        length=2,
    ),
)

POLICY_NODE = Schema(
    "policy_node",
    _SHARED
    + (
        ParamSpec(
            "cameras.transport",
            "string",
            "raw: sensor_msgs/Image; compressed: sensor_msgs/CompressedImage "
            "(jpeg/png) on the topics in cameras.topics",
            choices=("raw", "compressed"),
        ),
        ParamSpec(
            "cameras.qos",
            "string",
            "camera subscription QoS: sensor_data (best effort, keep last 5) or reliable",
            choices=("sensor_data", "reliable"),
        ),
        ParamSpec(
            "cameras.max_age",
            "double",
            "staleness limit (s): the node holds when a camera's newest frame arrived longer ago than this",
            range=(0.01, 10.0),
            dynamic=True,
        ),
        ParamSpec(
            "cameras.sync_slop",
            "double",
            "approximate-time window (s): the header stamps of one observation's frames may differ by at most this",
            range=(0.0, 1.0),
            dynamic=True,
        ),
        ParamSpec(
            "arms.state_max_age", "double", "staleness limit (s) for the arm states", range=(0.01, 10.0), dynamic=True
        ),
        ParamSpec(
            "instruction.default",
            "string",
            "instruction used until one arrives on instruction.topic ('' = wait for one)",
        ),
        ParamSpec(
            "estop.topic",
            "string",
            "std_msgs/Bool e-stop topic: true holds the last safe command until false",
            allow_empty=False,
        ),
        ParamSpec(
            "policy.path",
            "string",
            "policy directory (π0 checkpoint or qvla_quant artifact) to load; "
            "ReloadPolicy swaps it at run time (required: the node refuses to start without one)",
        ),
        ParamSpec("policy.device", "string", "torch device for inference: cpu, cuda or cuda:N"),
        ParamSpec("policy.warmup", "bool", "run one blank inference at load time so the first real one is not slow"),
        ParamSpec(
            "policy.worker",
            "string",
            "where inference runs: process (a child process, own GIL; default) or thread (in the node process)",
            choices=("process", "thread"),
        ),
        ParamSpec(
            "policy.worker_nice",
            "integer",
            "nice increment of the inference worker process so the 30 Hz control "
            "loop wins the CPU; 0 = same priority (not applied to a thread worker: GIL priority inversion)",
            range=(0, 19),
        ),
        ParamSpec(
            "policy.torch_threads",
            "integer",
            "torch intra-op threads for inference (0 = torch's default)",
            range=(0, 256),
        ),
        ParamSpec(
            "policy.min_interval",
            "double",
            "minimum time (s) between the starts of two inferences; 0 = back to back",
            range=(0.0, 60.0),
            dynamic=True,
        ),
        ParamSpec("control.rate_hz", "double", "command rate (Hz) of the control timer", range=(1.0, 1000.0)),
        ParamSpec(
            "control.realtime_priority",
            "integer",
            "SCHED_FIFO priority of the thread that runs the control "
            "timer (1-99; 0 = normal scheduling). Needs CAP_SYS_NICE (or an rtprio limit); without it the node "
            "says so and runs with normal scheduling. Process worker only (GIL priority inversion otherwise)",
            range=(0, 99),
        ),
        ParamSpec(
            "control.blending",
            "string",
            "how overlapping chunks combine: temporal_ensemble, weighted_overlap or "
            "latest (see qvla_ros.control.scheduler)",
            choices=BLENDING_MODES,
            dynamic=True,
        ),
        ParamSpec(
            "control.ensemble_decay",
            "double",
            "temporal_ensemble: weight exp(-decay * chunk age difference), "
            "1/s; > 0 favours newer chunks, < 0 older ones (ACT)",
            range=(-100.0, 100.0),
            dynamic=True,
        ),
        ParamSpec(
            "control.overlap_new_weight",
            "double",
            "weighted_overlap: weight of the new chunk where it overlaps the old plan",
            range=(0.01, 1.0),
            dynamic=True,
        ),
        ParamSpec(
            "control.blend_ramp",
            "double",
            "temporal_ensemble: seconds over which a new chunk fades in",
            range=(0.0, 5.0),
            dynamic=True,
        ),
        ParamSpec(
            "output.trajectory_time_from_start",
            "double",
            "joint_trajectory: time_from_start of the single point (s); 0 = one control period",
            range=(0.0, 10.0),
        ),
        ParamSpec(
            "output.y1_joint_velocity",
            "integer",
            "y1: joint speed on the vendor's 1 (slow) .. 10 (fast) scale",
            range=(1, 10),
        ),
        ParamSpec("output.y1_gripper_velocity", "integer", "y1: gripper speed, 1 .. 10", range=(1, 10)),
        ParamSpec(
            "safety.arm_description",
            "string",
            "arm description YAML with the joint limits (a file name is looked up in qvla_ros's config/)",
            allow_empty=False,
        ),
        ParamSpec(
            "safety.arm_profile",
            "string",
            "profile in the arm description: y1, sim_vx300s, or real/sim for the file's default",
            allow_empty=False,
        ),
        ParamSpec(
            "safety.step_scale",
            "double",
            "scales the per-tick step limit (max velocity / rate_hz from the arm description)",
            range=(0.01, 10.0),
            dynamic=True,
        ),
        ParamSpec(
            "safety.state_margin",
            "double",
            "a measured arm state outside its joint limits by more than this "
            "fraction of the joint's range is refused as an observation (the node holds and says which joint)",
            range=(0.0, 10.0),
            dynamic=True,
        ),
        ParamSpec(
            "diagnostics.period",
            "double",
            "seconds between /diagnostics messages (also sent at once when the node starts or stops holding)",
            range=(0.05, 60.0),
        ),
        ParamSpec("publish.chunks", "bool", "publish every chunk as qvla_msgs/ActionChunk on ~/action_chunk"),
    ),
)

SIM_RIG_NODE = Schema(
    "sim_rig",
    _SHARED
    + (
        ParamSpec(
            "sim.backend",
            "string",
            "mujoco: the MuJoCo ALOHA scene (qvla_ros.sim.rig); kinematic: joints that "
            "follow commands and synthetic images, no physics or OpenGL (timing tests, benchmarks)",
            choices=("mujoco", "kinematic"),
        ),
        ParamSpec(
            "sim.task", "string", "simulated task: transfer_cube or insertion", choices=("transfer_cube", "insertion")
        ),
        ParamSpec(
            "sim.seed", "integer", "seed of the first episode (later resets count up from it)", range=(0, 2**31 - 1)
        ),
        ParamSpec("sim.image_height", "integer", "camera image height (px)", range=(8, 4096)),
        ParamSpec("sim.image_width", "integer", "camera image width (px)", range=(8, 4096)),
        ParamSpec("sim.camera_rate_hz", "double", "camera frame rate (Hz)", range=(0.5, 120.0)),
        ParamSpec("sim.control_hz", "double", "physics control rate (Hz); must divide 500", range=(1.0, 500.0)),
        ParamSpec(
            "sim.command_hz", "double", "nominal command rate (Hz) the rig interpolates over", range=(1.0, 500.0)
        ),
        ParamSpec(
            "sim.cameras_enabled",
            "bool_array",
            "per camera (cameras.names order): publish it or not; switch "
            "one off at run time to simulate a camera failure",
            dynamic=True,
        ),
        ParamSpec(
            "sim.teleop",
            "bool",
            "run the scripted teleoperator (qvla_ros.sim.teleop): it publishes leader-arm "
            "commands on the command topics (output.adapter / output.topics) at sim.command_hz, restarting at "
            "every START, and the rig follows them like any command (recording demonstrations through ROS)",
        ),
        ParamSpec(
            "episode.success_topic",
            "string",
            "std_msgs/Bool, latched: whether the current episode has succeeded (updated when it changes)",
            allow_empty=False,
        ),
        ParamSpec(
            "episode.service",
            "string",
            "qvla_msgs/EpisodeControl service: START resets the scene (seed from "
            "sim.seed + episode count), STOP reports the outcome",
            allow_empty=False,
        ),
    ),
)


def _threshold(name: str, what: str, warn: float, error: float) -> ParamSpec:
    return ParamSpec(
        f"monitor.thresholds.{name}",
        "double_array",
        f"[warning, error] limits on {what}: the "
        f"monitor's diagnostics go to WARN / ERROR at these values (0 = that level is off; e.g. "
        f"[{warn:g}, {error:g}])",
        range=(0.0, 1e9),
        length=2,
    )


MONITOR_NODE = Schema(
    "monitor",
    _SHARED
    + tuple(POLICY_NODE.spec(n) for n in ("cameras.transport", "cameras.qos", "diagnostics.period"))
    + (
        ParamSpec(
            "monitor.reference_path",
            "string",
            "full-precision reference policy directory (the float π0 the "
            "running artifact was quantized from; a qvla_quant artifact is refused). Required: with "
            "qvla-bringup / ros2 launch, reference:=DIR (default: the running artifact's recorded source policy)",
        ),
        ParamSpec(
            "monitor.device",
            "string",
            "torch device of the reference: cpu, cuda or cuda:N (on a robot often a "
            "second GPU, or the policy's GPU at a lower rate: monitor.min_interval)",
        ),
        ParamSpec(
            "monitor.worker",
            "string",
            "where the reference runs: process (a child process, niced; default) or thread (in the monitor's process)",
            choices=("process", "thread"),
        ),
        ParamSpec(
            "monitor.worker_nice",
            "integer",
            "nice increment of the reference process (the policy node's inference and control loop win the CPU)",
            range=(0, 19),
        ),
        ParamSpec(
            "monitor.nice",
            "integer",
            "nice increment of the monitor node's own process (it must never slow the policy node)",
            range=(0, 19),
        ),
        ParamSpec(
            "monitor.torch_threads",
            "integer",
            "torch intra-op threads of the reference (0 = torch's default); "
            "with the policy node's device and policy.torch_threads, an identical policy deviates by exactly 0",
            range=(0, 256),
        ),
        ParamSpec(
            "monitor.min_interval",
            "double",
            "minimum time (s) between the starts of two reference predictions "
            "(chunks arriving meanwhile are skipped and counted)",
            range=(0.0, 60.0),
            dynamic=True,
        ),
        ParamSpec(
            "monitor.queue_depth",
            "integer",
            "chunks that may wait for the reference; when more arrive the "
            "oldest is skipped (counted in ActionDeviation.skipped)",
            range=(1, 64),
        ),
        ParamSpec("monitor.chunk_topic", "string", "the policy node's qvla_msgs/ActionChunk topic", allow_empty=False),
        ParamSpec(
            "monitor.frame_buffer",
            "double",
            "seconds of camera frames kept to rebuild a chunk's observation "
            "(longer than the policy's observation-to-chunk latency)",
            range=(0.05, 30.0),
        ),
        ParamSpec(
            "monitor.match_timeout",
            "double",
            "seconds a chunk waits for frames it names that have not arrived; then it is counted as unmatched",
            range=(0.0, 10.0),
        ),
        _threshold("first_action", "the first action's L2 deviation (all joints)", 0.1, 0.3),
        _threshold("chunk", "the L2 deviation over a chunk (Eq. 4)", 0.5, 1.5),
        _threshold("cumulative", "the cumulative deviation over the episode (Eq. 5)", 20.0, 60.0),
        _threshold("max_joint", "the largest per-joint deviation in a chunk", 0.1, 0.3),
        _threshold("tracking", "the largest per-arm tracking error (commanded - measured joint positions)", 0.3, 0.8),
        ParamSpec(
            "monitor.fallback.path",
            "string",
            "higher-precision artifact (or the float policy) the policy node "
            "is asked to load (ReloadPolicy) when a deviation stays at ERROR for monitor.fallback.hold; '' = off",
        ),
        ParamSpec(
            "monitor.fallback.hold",
            "double",
            "seconds a deviation must stay at the error level, without a "
            "break, before the fallback is requested (once)",
            range=(0.0, 3600.0),
        ),
        ParamSpec(
            "monitor.fallback.service", "string", "the policy node's qvla_msgs/ReloadPolicy service", allow_empty=False
        ),
        ParamSpec(
            "monitor.tracking.max_gap",
            "double",
            "largest stamp difference (s) between a command and the "
            "measured state it is compared with for the tracking error",
            range=(0.001, 10.0),
        ),
        ParamSpec(
            "monitor.markers.enabled",
            "bool",
            "publish ~/markers (visualization_msgs/MarkerArray): both arms' "
            "predicted gripper paths, policy and reference",
        ),
        ParamSpec(
            "monitor.markers.frame",
            "string",
            "frame_id of the markers (the arm model's world frame; rviz's Fixed Frame)",
            allow_empty=False,
        ),
        ParamSpec(
            "monitor.markers.model",
            "string",
            "MuJoCo model (MJCF) of the arms for the forward kinematics; '' = "
            "the simulated rig's (gym-aloha); a real rig gives its IMETA-Y1 model",
        ),
        ParamSpec(
            "monitor.markers.arm_joints",
            "string_array",
            "the model's six arm joints per arm (left, then right), driven by joints 1..6 of each arm",
            length=12,
        ),
        ParamSpec("monitor.markers.tip_bodies", "string_array", "the model's gripper body per arm", length=2),
        ParamSpec(
            "monitor.markers.tip_offset",
            "double_array",
            "fingertip point in the gripper body's frame (m)",
            length=3,
            range=(-10.0, 10.0),
        ),
    ),
)


RECORDER_NODE = Schema(
    "recorder",
    (
        ParamSpec(
            "recorder.dataset",
            "string",
            "dataset directory: one episode_NNNNNN rosbag2 (MCAP) directory per "
            "demonstration; an existing one is resumed (numbering continues; required)",
        ),
        ParamSpec(
            "recorder.topics_file",
            "string",
            "topic configuration to record ('' = the package's "
            "config/topics.yaml): cameras, both arms' states and commands, instruction, episode success",
        ),
        ParamSpec(
            "recorder.camera_qos",
            "string",
            "camera subscription QoS: sensor_data (best effort, what camera "
            "drivers offer) or reliable (only against reliable publishers)",
            choices=("sensor_data", "reliable"),
        ),
        ParamSpec(
            "recorder.compress",
            "bool",
            "zstd-compress the MCAP chunks (simulated images shrink ~20x; costs CPU for real camera images)",
        ),
        ParamSpec(
            "recorder.flush_period",
            "double",
            "seconds between flushes of the pending MCAP chunk to the OS: at "
            "most this much is lost if the process dies",
            range=(0.05, 60.0),
        ),
        ParamSpec("recorder.fsync", "bool", "force every flush to the disk too (survives a power cut)"),
        ParamSpec(
            "recorder.min_free_gb",
            "double",
            "refuse to start, and end a running episode, when the disk has less free space than this (GB)",
            range=(0.0, 1e6),
        ),
        ParamSpec(
            "recorder.max_queue_mb",
            "double",
            "message bytes waiting to be written at most (MB); beyond, messages are dropped and counted per topic",
            range=(1.0, 1e5),
        ),
        ParamSpec(
            "recorder.recover",
            "string",
            "an episode interrupted by a crash, found at start: aside (repaired into "
            "<dataset>/.recovered), keep (repaired into the dataset, marked incomplete) or report (left as it "
            "is)",
            choices=("aside", "keep", "report"),
        ),
        ParamSpec(
            "recorder.instruction",
            "string",
            "task instruction written into every episode ('' = the latest one "
            "received on the instruction topic; a START request's instruction wins over both)",
        ),
        ParamSpec("recorder.task", "string", "task name stored in the episodes' metadata"),
        ParamSpec("recorder.rig", "string", "description of the rig stored in the episodes' metadata"),
        ParamSpec("recorder.teleoperator", "string", "who or what teleoperated, stored in the episodes' metadata"),
        ParamSpec(
            "recorder.auto_start",
            "bool",
            "record episodes one after another from the start (lerobot-record "
            "style: episode_time, then reset_time, until num_episodes are kept); false: wait for EpisodeControl "
            "START",
        ),
        ParamSpec(
            "recorder.episode_time",
            "double",
            "seconds after which an episode ends and is kept (0 = until stopped by a key or EpisodeControl STOP)",
            range=(0.0, 86400.0),
        ),
        ParamSpec(
            "recorder.reset_time",
            "double",
            "seconds of reset phase between two episodes (auto_start), not recorded: time to put the scene back",
            range=(0.0, 3600.0),
        ),
        ParamSpec(
            "recorder.num_episodes",
            "integer",
            "auto_start: stop recording after this many kept episodes (0 = until Esc or shutdown)",
            range=(0, 1_000_000),
        ),
        ParamSpec(
            "recorder.exit_when_done",
            "bool",
            "exit the process once recording has stopped (num_episodes reached or Esc)",
        ),
        ParamSpec(
            "recorder.keyboard",
            "bool",
            "read keys when stdin is a terminal: right arrow ends the episode and "
            "keeps it, left arrow discards it and records it again, Esc stops recording",
        ),
        ParamSpec(
            "recorder.status_period",
            "double",
            "seconds between live status lines (episode, duration, per-topic rates, drops, MB written); 0 = none",
            range=(0.0, 3600.0),
        ),
        ParamSpec(
            "recorder.rig_service",
            "string",
            "EpisodeControl service of the rig to call when an episode starts "
            "(START: reset the scene, with the instruction) and ends (STOP, for its outcome); '' = none (the "
            "simulated rig: /qvla/sim/episode)",
        ),
    ),
)

CALIBRATION_NODE = Schema(
    "calibration",
    (
        ParamSpec(
            "calibration.policy",
            "string",
            "full-precision policy directory calibrated when a goal names none ('' = every goal must give policy_path)",
        ),
        ParamSpec(
            "calibration.output_dir",
            "string",
            "directory for artifacts of goals without output_path ('' = next "
            "to the policy: <policy>_calib_<budget>b_<time>)",
        ),
        ParamSpec(
            "calibration.solver",
            "string",
            "allocation solver when a goal names none: greedy (the paper) or lagrangian",
            choices=("greedy", "lagrangian"),
        ),
        ParamSpec(
            "calibration.bits",
            "string",
            "candidate bit-widths per channel when a goal gives none, comma separated, from 0,2,4,8,16",
            allow_empty=False,
        ),
        ParamSpec(
            "calibration.samples_per_episode",
            "integer",
            "calibration samples drawn from each episode",
            range=(1, 100000),
        ),
        ParamSpec("calibration.max_episodes", "integer", "calibration episodes at most", range=(1, 100000)),
        ParamSpec(
            "calibration.validation_episodes",
            "integer",
            "episodes held out for validation (never calibrated on)",
            range=(0, 100000),
        ),
        ParamSpec(
            "calibration.validation_samples_per_episode",
            "integer",
            "teacher-forced samples per held-out episode",
            range=(1, 100000),
        ),
        ParamSpec(
            "calibration.exact_fraction",
            "double",
            "share of the channels refined by exact forward passes (per bit-width)",
            range=(0.0, 1.0),
        ),
        ParamSpec(
            "calibration.rank_sample",
            "integer",
            "random channels measured exactly to report the proxy's rank correlation",
            range=(0, 1000000),
        ),
        ParamSpec("calibration.seed", "integer", "seed of the sample choice, noise and probes", range=(0, 2**31 - 1)),
        ParamSpec("calibration.skip_failed", "bool", "skip episodes marked as failed demonstrations"),
        ParamSpec(
            "calibration.max_action_mse",
            "double",
            "validation limit: an artifact whose teacher-forced action MSE "
            "vs full precision is above this is not handed over (no reload); 0 = no limit",
            range=(0.0, 1e6),
        ),
        ParamSpec(
            "calibration.torch_threads",
            "integer",
            "torch threads of the calibration process (0 = torch's default)",
            range=(0, 256),
        ),
        ParamSpec(
            "calibration.nice",
            "integer",
            "nice increment of the calibration process, so that a policy node on the same machine keeps its 30 Hz loop",
            range=(0, 19),
        ),
        ParamSpec(
            "calibration.reload_service",
            "string",
            "ReloadPolicy service of the policy node, called for goals with reload: true",
            allow_empty=False,
        ),
        ParamSpec(
            "calibration.reload_timeout", "double", "seconds to wait for the policy node's reload", range=(1.0, 3600.0)
        ),
    ),
)


def _policy_checks(v: dict) -> str:
    if len(v["cameras.topics"]) != len(v["cameras.names"]):
        return (
            f"cameras.topics has {len(v['cameras.topics'])} entries but cameras.names has "
            f"{len(v['cameras.names'])}: give one topic per camera"
        )
    if len(set(v["cameras.names"])) != len(v["cameras.names"]):
        return "cameras.names repeats a name"
    dev = v["policy.device"]
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        return f"policy.device {dev!r} must be cpu, cuda or cuda:N"
    return ""


def _sim_checks(v: dict) -> str:
    if len(v["cameras.topics"]) != len(v["cameras.names"]):
        return "cameras.topics and cameras.names need the same number of entries"
    if len(v["sim.cameras_enabled"]) != len(v["cameras.names"]):
        return (
            f"sim.cameras_enabled has {len(v['sim.cameras_enabled'])} entries; give one per camera "
            f"({len(v['cameras.names'])})"
        )
    return ""


def _monitor_checks(v: dict) -> str:
    if len(v["cameras.topics"]) != len(v["cameras.names"]):
        return "cameras.topics and cameras.names need the same number of entries"
    dev = v["monitor.device"]
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        return f"monitor.device {dev!r} must be cpu, cuda or cuda:N"
    for name in ("first_action", "chunk", "cumulative", "max_joint", "tracking"):
        warn, error = v[f"monitor.thresholds.{name}"]
        if warn > 0 and error > 0 and warn > error:
            return f"monitor.thresholds.{name} = [{warn}, {error}]: the warning limit must not exceed the error limit"
    return ""


_CROSS_CHECKS = {
    POLICY_NODE.node: (_policy_checks,),
    SIM_RIG_NODE.node: (_sim_checks,),
    MONITOR_NODE.node: (_monitor_checks,),
}


def _calibration_checks(v: dict) -> str:
    try:
        bits = [int(b) for b in v["calibration.bits"].split(",") if b.strip()]
    except ValueError:
        bits = [-1]
    if not bits or set(bits) - {0, 2, 3, 4, 6, 8, 16} or not set(bits) - {16}:
        return (
            f"calibration.bits {v['calibration.bits']!r} must be a comma-separated list from 0,2,3,4,6,8,16 "
            "with something below 16"
        )
    return ""


_CROSS_CHECKS[CALIBRATION_NODE.node] = (_calibration_checks,)
