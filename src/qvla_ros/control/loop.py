"""The policy node's decisions, without ROS: which observation the policy sees next, whether a control tick sends
the plan or holds (and why), when a fault voids the chunks planned or in flight, and what /diagnostics reports.

Time model. Every time here is in seconds on one clock, the node's clock (ROS time), and is passed in as `now`:
nothing here reads a clock, so a test drives the loop with plain numbers. Each input carries two times:
  * its stamp, when the sensor saw the world (the message header; the node uses the arrival time for drivers
    that leave it at zero). Camera frames are matched on stamps (`cameras.sync_slop`), an observation's stamp is
    the newest stamp of its frames, and row k of the chunk predicted from it is the target for
    `stamp + k * step_period` (qvla_ros.control.scheduler), so inference latency is skipped, not replayed;
  * its receipt time (`received`), when the node got it. Staleness is judged on receipt times
    (`cameras.max_age`, `arms.state_max_age`), so a camera whose clock is offset is still judged by when its
    frames arrive (qvla_ros.control.sync).
An episode START records `episode_start`, the time it was served: inputs received before it are not used after it.

Gating (`next_observation`, the inference worker's source). An observation is built when there is an instruction,
no e-stop and no STOP, no refused camera frame, a synchronized camera set newer than the last observation's stamp
(a camera whose clock restarted starts the stamp comparison over) and received after START, and a fresh, valid
state of every arm received after START. Frames are converted to RGB only then, through `decode` (the node's
message conversion), and only for the chosen set. Anything else: None, and the worker asks again.

Holding (`tick`, once per control period). The tick collects the hold reasons (key -> text: "estop", "paused",
"policy", "camera:NAME", "sync", "state:ARM", "inference", "input", "instruction", "state:reset"); with none, it
asks the scheduler for the blended target at `now`; the safety filter then passes it on (clipped to the limits,
rate-limited), or holds the last safe command with the reasons (qvla_ros.control.safety.Decision; its `command` is
None only before any command was sent or any arm state received).

Fault epochs. A hold reason that was not there on the previous tick (other than "no_action": nothing planned yet
is not a fault of the inputs) is a fault: the epoch counter advances and the scheduler is cleared, so neither the
chunks already planned nor those predicted from observations taken before the fault drive the arms once it clears
(`add_chunk` drops a chunk whose observation was handed out in an earlier epoch). An episode START advances the
epoch too, and makes the next command start from the arm state measured after it.

Threads, as in the node: the input callbacks and the control timer share one executor thread, the inference worker
(next_observation, add_chunk, inference_failed) is another, the services (episodes, reloads: policy_loaded) a
third. The loop takes no lock of its own: its attributes change by single assignments or dict operations (atomic
in CPython), and the synchronizers and the scheduler lock their own state.

    loop = ControlLoop(cfg, desc, decode=image_to_rgb)     # cfg: the policy node's parameters (control.params)
    loop.add_frame("top", stamp, received, msg, msg.header.stamp); loop.add_state("left", stamp, received, q7)
    got = loop.next_observation(now)                        # worker: (Observation, epoch) or None
    current, inputs = loop.add_chunk(chunk, epoch, now)     # worker: a chunk back; inputs: what it was built from
    decision = loop.tick(now, worker_status)                # timer: a command, or a hold with its reasons
    reports = diagnostics(loop, now, node_name, WorkerReport.of(worker), output_name, scheduling)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from qvla_ros.control.images import ImageFormatError
from qvla_ros.control.safety import ArmDescription, Decision, SafetyFilter, measured_state_problem
from qvla_ros.control.scheduler import ChunkScheduler
from qvla_ros.control.sync import ApproxTimeSync, LatestStore
from qvla_ros.control.timing import CycleTimer, LatencyStats, RateMonitor
from qvla_ros.policy.types import Observation

if TYPE_CHECKING:
    from qvla_ros.control.worker import PolicyInfo

# hold reasons that are not a fault of the inputs: nothing planned yet is no reason to discard chunks in flight
NOT_FAULTS = frozenset({"no_action"})
INPUTS_KEPT = 16  # observations whose inputs are remembered until their chunk comes back (oldest forgotten first)


class _Frame(NamedTuple):
    data: Any  # what `decode` turns into an RGB image (the received message)
    source_stamp: Any  # the stamp as its sender wrote it, returned untouched in ObservationInputs


@dataclass(frozen=True)
class ObservationInputs:
    """What one observation was built from: qvla_msgs/ActionChunk's observation fields, with which a monitor
    rebuilds the very same observation."""

    episode: int
    instruction: str
    camera_names: list[str]
    camera_stamps: list[Any]  # per camera, the frame's stamp as its sender wrote it (add_frame's source_stamp)
    state: np.ndarray


class ControlLoop:
    """Observation gating, hold reasons, fault epochs and the plan of the policy node (see the module docstring).

    cfg: the policy node's parameter values (qvla_ros.control.params.POLICY_NODE); the loop reads the dynamic ones
    again after `apply_parameters`. desc: the arm limits. decode(frame, source) -> HxWx3 uint8 RGB, raising
    ImageFormatError: the conversion of a received frame (qvla_ros.control.images.image_to_rgb, for example).
    """

    def __init__(self, cfg: Mapping[str, Any], desc: ArmDescription, decode: Callable[[Any, str], np.ndarray]):
        self.cfg = cfg
        self.desc = desc
        self.joint_names = list(cfg["arms.joint_names"])
        self.arm_names = list(cfg["arms.names"])
        self.rate_hz = cfg["control.rate_hz"]
        self._decode = decode
        self.cameras = ApproxTimeSync(cfg["cameras.names"], cfg["cameras.sync_slop"], cfg["cameras.max_age"])
        self.states = LatestStore(self.arm_names, cfg["arms.state_max_age"])
        self.scheduler = self._make_scheduler()
        self.safety = SafetyFilter(desc, self.rate_hz, cfg["safety.step_scale"])
        self.rate = RateMonitor(self.rate_hz)  # the caller ticks it and brackets each tick with cycle.begin/end
        self.cycle = CycleTimer(self.rate_hz)
        self.inference_latency = LatencyStats()
        self.camera_to_command = LatencyStats()
        self.observation_to_chunk = LatencyStats()

        self.instruction = cfg["instruction.default"]
        self.estop = False
        self.paused = False  # an episode STOP / DISCARD: hold until the next START
        self.epoch = 0
        self.inference_error = ""
        self.input_error = ""  # a frame of the chosen set that could not be converted
        self.episode = 0
        self.episode_start = -1.0  # when the last START was served: older inputs are not used after it
        self.last_obs_stamp = -1.0
        self.chunks_dropped = 0
        # per camera / arm: why its newest message was refused on arrival (cleared by the next good one)
        self.camera_errors: dict[str, str] = {}
        self.state_errors: dict[str, str] = {}
        self.policy_info: PolicyInfo | None = None
        self.last_decision: Decision | None = None
        self._inputs: dict[float, ObservationInputs] = {}  # per observation stamp, bounded
        self._sync_resets_seen = 0
        self._fault_keys: frozenset[str] = frozenset()

    def _make_scheduler(self) -> ChunkScheduler:
        c = self.cfg
        return ChunkScheduler(
            len(self.joint_names),
            mode=c["control.blending"],
            decay=c["control.ensemble_decay"],
            new_weight=c["control.overlap_new_weight"],
            ramp=c["control.blend_ramp"],
        )

    # ---------------------------------------------------------------- inputs (input callbacks)
    def add_frame(self, name: str, stamp: float, received: float, frame: Any, source_stamp: Any = None) -> None:
        """A camera frame whose fields passed the node's checks; `source_stamp` (default: `stamp`) is the stamp as
        the sender wrote it, handed back in the ObservationInputs of an observation that uses the frame."""
        self.camera_errors.pop(name, None)
        self.cameras.add(name, stamp, received, _Frame(frame, stamp if source_stamp is None else source_stamp))

    def refuse_frame(self, name: str, reason: str) -> None:
        """A malformed frame: the camera holds the node, with the reason, until its next good frame."""
        self.camera_errors[name] = reason

    def add_state(self, arm: str, stamp: float, received: float, q: np.ndarray) -> None:
        """An arm's 7 measured values in vector order; impossible values (non-finite, or far outside the limits:
        `safety.state_margin`) are refused with the joint they concern."""
        why = measured_state_problem(self.desc, q, self.arm_names.index(arm) * len(q), self.cfg["safety.state_margin"])
        if why:
            self.state_errors[arm] = f"arm state of {arm}: {why}"
            return
        self.state_errors.pop(arm, None)
        self.states.add(arm, stamp, received, q)

    def refuse_state(self, arm: str, reason: str) -> None:
        """An arm state message that could not be read: the arm holds the node until its next good state."""
        self.state_errors[arm] = f"arm state: {reason}"

    def state_vector(self, now: float) -> np.ndarray | None:
        """The measured 14-dim state, or None when an arm's state is missing, stale, refused, or older than START.
        (States are checked on arrival: the store holds each arm's last valid 7 values.)"""
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

    # ---------------------------------------------------------------- the inference worker's side
    def next_observation(self, now: float) -> tuple[Observation, int] | None:
        """The newest observation not yet handed out, with the epoch it belongs to; None when the gates are shut
        (see the module docstring). A frame that cannot be converted sets `input_error` (a hold reason)."""
        if self.estop or self.paused or not self.instruction:
            return None
        if self.camera_errors:
            return None
        if self.cameras.resets != self._sync_resets_seen:
            # a camera's clock restarted: stamps from before it say nothing about what is new now
            self._sync_resets_seen = self.cameras.resets
            self.last_obs_stamp = -1.0
        sync = self.cameras.newest(now)
        if not sync.ok or sync.stamp <= self.last_obs_stamp:
            return None
        if any(item.received < self.episode_start for item in sync.items.values()):
            return None
        state = self.state_vector(now)
        if state is None:
            return None
        try:
            # copies: the conversion may return read-only views of the message buffers
            images = {
                name: np.array(self._decode(item.msg.data, f"camera '{name}'")) for name, item in sync.items.items()
            }
        except ImageFormatError as e:
            self.input_error = str(e)
            return None
        self.input_error = ""
        self.last_obs_stamp = sync.stamp
        instruction = self.instruction
        self._inputs[sync.stamp] = ObservationInputs(
            self.episode, instruction, list(sync.items), [item.msg.source_stamp for item in sync.items.values()], state
        )
        while len(self._inputs) > INPUTS_KEPT:
            self._inputs.pop(next(iter(self._inputs)))
        return Observation(images=images, state=state, instruction=instruction, stamp=sync.stamp), self.epoch

    def add_chunk(self, chunk, epoch: int, now: float) -> tuple[bool, ObservationInputs | None]:
        """A chunk predicted from the observation handed out with `epoch` (a qvla_ros.policy.types chunk).
        Returns (current, inputs): current is False when a fault or a START came after its observation (the chunk
        is dropped and is not to be published); inputs: what its observation was built from (None: forgotten)."""
        inputs = self._inputs.pop(chunk.stamp, None)
        self.inference_latency.add(chunk.latency)
        self.observation_to_chunk.add(now - chunk.stamp)
        self.inference_error = ""
        if epoch != self.epoch:
            self.chunks_dropped += 1  # predicted from inputs that came before a fault or a new episode
            return False, inputs
        if not self.scheduler.add(chunk.actions, chunk.stamp, chunk.step_period, now, chunk.model_id):
            self.chunks_dropped += 1
        return True, inputs

    def inference_failed(self, message: str) -> bool:
        """A predict failed (a hold reason until the next chunk or policy); True when the message is a new one."""
        new = message != self.inference_error
        self.inference_error = message
        return new

    def policy_loaded(self, info: PolicyInfo) -> None:
        self.policy_info = info
        self.inference_error = ""  # errors of the policy this one replaces (or of failed loads) no longer apply

    def check_policy(self, info: PolicyInfo) -> str:
        """'' when the policy fits the rig, else why it is refused."""
        if list(info.joint_names) != self.joint_names:
            return (
                f"the policy's joints {info.joint_names} differ from arms.joint_names {self.joint_names} "
                "(same names in the same order are required)"
            )
        missing = [c for c in info.camera_names if c not in self.cameras.names]
        if missing:
            return (
                f"the policy takes cameras {info.camera_names} but cameras.names is {list(self.cameras.names)} "
                f"(missing {missing})"
            )
        return ""

    # ---------------------------------------------------------------- the control tick
    def hold_reasons(self, now: float, policy_status: str, policy_error: str = "") -> dict[str, str]:
        """Why the inputs do not allow a command now (empty: they do). policy_status: the inference worker's
        status ("running" when a policy is loaded), policy_error: why its last load failed."""
        r = {}
        if self.estop:
            r["estop"] = f"e-stop engaged ({self.cfg['estop.topic']} is true)"
        if self.paused:
            r["paused"] = "episode stopped (EpisodeControl STOP); START resumes"
        if policy_status != "running":
            r["policy"] = f"policy {policy_status}" + (f": {policy_error}" if policy_error else "")
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

    def tick(self, now: float, policy_status: str, policy_error: str = "") -> Decision:
        """One control period: the command to send, or the hold with its reasons. A new fault advances the epoch
        and clears the plan. Times the inputs / plan / safety sections in `cycle` (the caller begins and ends it)."""
        with self.cycle.section("inputs"):
            reasons = self.hold_reasons(now, policy_status, policy_error)
            fallback = self.state_vector(now) if self.safety.last is None else None
            if self.safety.last is None and fallback is None and self.episode_start > 0:
                reasons.setdefault("state:reset", "waiting for an arm state newer than the episode START")
        with self.cycle.section("plan"):
            target, first_use = (None, []) if reasons else self.scheduler.target(now)
        for stamp in first_use:
            self.camera_to_command.add(now - stamp)
        with self.cycle.section("safety"):
            d = self.safety.step(target, reasons, fallback)
        faults = frozenset(d.reasons) - NOT_FAULTS
        if faults - self._fault_keys:
            # a new fault: chunks planned or in flight from before it must not drive the arms when it clears
            self.epoch += 1
            self.scheduler.clear()
        self._fault_keys = faults
        self.last_decision = d
        return d

    # ---------------------------------------------------------------- episodes and parameters
    def start_episode(self, now: float, instruction: str = "") -> int:
        """EpisodeControl START: a new episode from the arm state measured after `now`; returns its number."""
        if instruction:
            self.instruction = instruction
        self.episode += 1
        self.episode_start = now
        self.epoch += 1
        self.scheduler.clear()
        self.safety.reset()  # the next command starts from the arm state measured after START
        self.paused = False
        return self.episode

    def stop_episode(self) -> int:
        """EpisodeControl STOP / DISCARD: hold until the next START; returns the episode number."""
        self.paused = True
        self.scheduler.clear()
        return self.episode

    def apply_parameters(self, names: list[str]) -> None:
        """The dynamic parameters `names` changed in `cfg`: apply them (a control.* change starts a new plan under
        the new blending; the old one is dropped)."""
        c = self.cfg
        self.cameras.max_age, self.cameras.slop = c["cameras.max_age"], c["cameras.sync_slop"]
        self.states.max_age = c["arms.state_max_age"]
        self.safety.max_step = self.desc.max_velocity / self.rate_hz * c["safety.step_scale"]
        if any(n.startswith("control.") for n in names):
            self.scheduler = self._make_scheduler()


# ---------------------------------------------------------------- diagnostics
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels


@dataclass(frozen=True)
class WorkerReport:
    """What the diagnostics say about the inference worker: a snapshot of an InferenceWorker's counters."""

    mode: str
    status: str
    load_error: str = ""
    predictions: int = 0
    failures: int = 0
    restarts: int = 0
    child_pids: tuple[int, ...] = ()

    @classmethod
    def of(cls, worker) -> WorkerReport:
        """The report of a qvla_ros.control.worker.InferenceWorker."""
        return cls(
            worker.mode,
            worker.status,
            worker.load_error,
            worker.predictions,
            worker.failures,
            worker.restarts,
            tuple(worker.child_pids),
        )


@dataclass(frozen=True)
class StatusReport:
    """One diagnostic_msgs/DiagnosticStatus as plain data: level OK / WARN / ERROR, values as the strings sent."""

    name: str
    hardware_id: str
    level: int
    message: str
    values: dict[str, str]


def _strings(**values) -> dict[str, str]:
    return {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in values.items()}


def diagnostics(
    loop: ControlLoop,
    now: float,
    node_name: str,
    worker: WorkerReport,
    output: str = "",
    scheduling: str = "normal scheduling",
) -> list[StatusReport]:
    """The policy node's /diagnostics: "commands" (stream rate, jitter, holds and why), "inference" (the policy,
    latencies, dropped chunks), then one status per camera and per arm state (age, rate, counters). `output`: the
    arm output's name; `scheduling`: how the control thread is scheduled."""
    d = loop.last_decision
    rate = loop.rate.summary()
    cyc = loop.cycle.summary()
    if d is None or d.command is None:
        level, message = ERROR, "no command sent: " + (d.why if d else "starting")
    elif d.held:
        level, message = WARN, f"holding: {d.why}"
    else:
        level, message = OK, f"streaming at {rate['rate_hz']:.1f} Hz"
    safety = loop.safety
    cmd = StatusReport(
        f"{node_name}: commands",
        node_name,
        level,
        message,
        _strings(
            rate_hz=rate["rate_hz"],
            expected_hz=loop.rate_hz,
            period_p50_ms=rate["period_p50"] * 1e3,
            period_p99_ms=rate["period_p99"] * 1e3,
            period_max_ms=rate["period_max"] * 1e3,
            period_error_p99_ms=rate["period_error_p99"] * 1e3,
            overruns=rate["overruns"],
            ticks=rate["ticks"],
            held=bool(d and d.held),
            hold_reasons=",".join(d.reasons) if d else "",
            held_ticks=safety.held_ticks,
            clipped_ticks=safety.clipped_ticks,
            rate_limited_ticks=safety.rate_limited_ticks,
            body_p99_ms=cyc["body_p99"] * 1e3,
            slow_ticks=cyc["slow_ticks"],
            adapter=output,
            episode=loop.episode,
            scheduling=scheduling,
        ),
    )

    lat, c2c, o2c = (
        loop.inference_latency.summary(),
        loop.camera_to_command.summary(),
        loop.observation_to_chunk.summary(),
    )
    info = loop.policy_info
    if worker.status != "running":
        level, message = ERROR, f"policy {worker.status} {worker.load_error}"
    elif loop.inference_error:
        level, message = ERROR, loop.inference_error
    else:
        level, message = OK, f"{info.model_id if info else ''}: p50 {lat['p50'] * 1e3:.0f} ms"
    inf = StatusReport(
        f"{node_name}: inference",
        node_name,
        level,
        message,
        _strings(
            model_id=info.model_id if info else "",
            worker=worker.mode,
            status=worker.status,
            latency_p50_ms=lat["p50"] * 1e3,
            latency_p99_ms=lat["p99"] * 1e3,
            latency_max_ms=lat["max"] * 1e3,
            predictions=worker.predictions,
            failures=worker.failures,
            restarts=worker.restarts,
            chunks_dropped=loop.chunks_dropped,
            camera_to_command_p50_ms=c2c["p50"] * 1e3,
            camera_to_command_p99_ms=c2c["p99"] * 1e3,
            observation_to_chunk_p50_ms=o2c["p50"] * 1e3,
            observation_to_chunk_p99_ms=o2c["p99"] * 1e3,
            worker_pids=",".join(str(p) for p in worker.child_pids),
        ),
    )

    out = [cmd, inf]
    stats = loop.cameras.stats()
    for cam, age in loop.cameras.ages(now).items():
        s = stats[cam]
        stale = age is None or age > loop.cameras.max_age
        out.append(
            StatusReport(
                f"{node_name}: camera {cam}",
                cam,
                WARN if stale else OK,
                "no frame yet" if age is None else (f"stale ({age * 1e3:.0f} ms)" if stale else "ok"),
                _strings(
                    age_ms=(age or 0.0) * 1e3,
                    rate_hz=(1.0 / s["period"]) if s["period"] else 0.0,
                    frames=s["frames"],
                    dropped=s["dropped"],
                    out_of_order=s["out_of_order"],
                    unmatched_sets=loop.cameras.unmatched,
                ),
            )
        )
    for arm, age in loop.states.ages(now).items():
        stale = age is None or age > loop.states.max_age
        out.append(
            StatusReport(
                f"{node_name}: arm {arm} state",
                arm,
                WARN if stale else OK,
                "no state yet" if age is None else (f"stale ({age * 1e3:.0f} ms)" if stale else "ok"),
                _strings(age_ms=(age or 0.0) * 1e3),
            )
        )
    return out
