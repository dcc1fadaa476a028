"""Live action deviation of the running (quantized) policy from its full-precision reference: the monitor node's
logic, without ROS.

    monitor = DeviationMonitor(joint_names, arm_names, camera_names, frame_buffer=1.0, queue_depth=1)
    monitor.add_frame("top", stamp_ns, received, msg)       # camera callbacks: frames keyed by header stamp
    monitor.add_chunk(ChunkRecord(...), now)                 # the policy node's ActionChunk, with what it used
    job = monitor.next_job(now)                              # worker: the exact observation of a chunk, or None
    result = monitor.finish(job, reference_actions, latency) # Eq. 4 for the chunk, Eq. 5 summed over the episode

Matching is exact: an ActionChunk names the header stamp of every camera frame it was predicted from (and carries
the measured state and the instruction), so the reference predicts on the very same inputs; with the same policy
on both sides the deviation is exactly 0. Chunks are matched by those stamps, whatever order they arrive in. When
the reference cannot keep up, the oldest waiting chunks are left out (`skipped`); chunks whose frames are not in the
buffer (lost, or older than the buffer) are counted as `unmatched`. A chunk of a new episode (ActionChunk.episode,
the policy node's START count) resets the cumulative sums; chunks of an earlier episode still in flight are left out.

Also here: the tracking error (commanded vs measured joint positions), warning/error thresholds with the hold timer
of the higher-precision fallback, forward kinematics of the gripper paths (MuJoCo model of the arms) and the
rviz marker descriptions built from them.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}
# quantities with thresholds; the policy ones (all but tracking) decide the fallback
QUANTITIES = ("first_action", "chunk", "cumulative", "max_joint", "tracking")
POLICY_QUANTITIES = ("first_action", "chunk", "cumulative", "max_joint")
DESCRIPTIONS = {
    "first_action": "L2 deviation of the chunk's first action (all joints)",
    "chunk": "L2 deviation over the whole chunk (Eq. 4)",
    "cumulative": "cumulative deviation over the episode (Eq. 5)",
    "max_joint": "largest per-joint deviation in the chunk",
    "tracking": "largest per-arm tracking error (commanded - measured)",
}


def stamp_ns(sec: int, nanosec: int) -> int:
    """A ROS time as one exact integer (the matching key: no float rounding)."""
    return int(sec) * 1_000_000_000 + int(nanosec)


def arm_slices(joint_names: list[str] | tuple[str, ...], arm_names: list[str] | tuple[str, ...]) -> list[slice]:
    """Each arm's columns in the joint vector (equal blocks, arm order)."""
    n, k = len(joint_names), len(arm_names)
    if k == 0 or n % k:
        raise ValueError(f"{n} joints do not split into {k} arms")
    per = n // k
    return [slice(i * per, (i + 1) * per) for i in range(k)]


# ---------------------------------------------------------------- stamp matching
@dataclass
class ChunkRecord:
    """What the monitor needs of one qvla_msgs/ActionChunk."""

    stamp: float  # observation stamp (s)
    episode: int
    model_id: str
    joint_names: list[str]
    actions: np.ndarray  # [horizon, n_joints]
    instruction: str
    camera_names: list[str]
    camera_stamps: list[int]  # stamp_ns of each camera's frame
    state: np.ndarray  # [n_joints]
    step_period: float = 1 / 30
    header_ns: int = 0  # the chunk's header stamp exactly (stamp_ns), echoed in the deviation's header


@dataclass
class Job:
    """A chunk matched to its frames: the reference predicts on exactly this observation."""

    chunk: ChunkRecord
    frames: dict[str, Any]  # camera name -> the message (converted to pixels by the caller)
    received: float


@dataclass
class DeviationResult:
    stamp: float
    header_ns: int
    episode: int
    episode_step: int
    model_id: str
    arm_names: list[str]
    first_action_l2: list[float]
    chunk_l2: list[float]
    cumulative_l2: list[float]
    first_action_l2_total: float
    chunk_l2_total: float
    cumulative_l2_total: float
    cumulative_first_action_l2_total: float
    max_joint_deviation: float
    max_joint_name: str
    max_joint_step: int
    reference_latency: float
    actions: np.ndarray = field(repr=False)  # the policy's chunk (for markers)
    reference: np.ndarray = field(repr=False)  # the reference's chunk


class FrameBuffer:
    """The last `keep` seconds of frames per camera (by receipt time), keyed by exact header stamp."""

    def __init__(self, names, keep: float):
        if keep <= 0:
            raise ValueError(f"frame buffer length must be > 0 s, got {keep}")
        self.keep = float(keep)
        self._frames: dict[str, OrderedDict[int, tuple[float, Any]]] = {n: OrderedDict() for n in names}

    def add(self, name: str, key: int, received: float, msg: Any) -> None:
        q = self._frames[name]
        q[key] = (received, msg)
        q.move_to_end(key)
        while q and received - next(iter(q.values()))[0] > self.keep:
            q.popitem(last=False)

    def get(self, name: str, key: int):
        entry = self._frames.get(name, {}).get(key)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return sum(len(q) for q in self._frames.values())


class DeviationMonitor:
    """Frames + chunks -> matched jobs for the reference -> deviations with per-episode sums. Thread-safe: the ROS
    callbacks add frames and chunks, the reference worker takes jobs and finishes them."""

    def __init__(
        self,
        joint_names,
        arm_names,
        camera_names,
        *,
        frame_buffer: float = 1.0,
        queue_depth: int = 1,
        match_timeout: float = 0.5,
        waiting_limit: int = 16,
    ):
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        self.joint_names = list(joint_names)
        self.arm_names = list(arm_names)
        self.camera_names = list(camera_names)
        self.slices = arm_slices(self.joint_names, self.arm_names)
        self.frames = FrameBuffer(self.camera_names, frame_buffer)
        self.queue_depth = int(queue_depth)
        self.match_timeout = float(match_timeout)
        self._waiting: deque[tuple[float, ChunkRecord]] = deque(maxlen=waiting_limit)  # frames not all here yet
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()
        self.episode = -1  # newest episode seen in a chunk
        self.compared = 0
        self.skipped = 0
        self.unmatched = 0
        self.refused = 0  # chunks that do not fit (joint names, shapes, cameras)
        self.last_problem = ""
        self._sum_episode = -1
        self._steps = 0
        self._cum = np.zeros(len(self.arm_names))
        self._cum_total = 0.0
        self._cum_first = 0.0

    # -- inputs
    def add_frame(self, name: str, key: int, received: float, msg: Any) -> None:
        with self._lock:
            self.frames.add(name, key, received, msg)

    def add_chunk(self, chunk: ChunkRecord, now: float) -> None:
        why = self._check(chunk)
        with self._lock:
            if why:
                self.refused += 1
                self.last_problem = why
                return
            if chunk.episode < self.episode:
                self.skipped += 1  # predicted before the current episode's START
                return
            self.episode = max(self.episode, chunk.episode)
            self._waiting.append((now, chunk))
            self._match(now)

    def _check(self, c: ChunkRecord) -> str:
        if list(c.joint_names) != self.joint_names:
            return f"chunk joint names {list(c.joint_names)} differ from arms.joint_names {self.joint_names}"
        a = np.asarray(c.actions)
        if a.ndim != 2 or a.shape[1] != len(self.joint_names) or a.shape[0] < 1:
            return f"chunk positions have shape {a.shape}, expected [horizon, {len(self.joint_names)}]"
        if len(c.state) != len(self.joint_names):
            return (
                f"chunk carries {len(c.state)} state values, expected {len(self.joint_names)} (a policy node "
                "that does not fill ActionChunk.state cannot be monitored)"
            )
        if len(c.camera_stamps) != len(c.camera_names) or not c.camera_names:
            return "chunk has no camera stamps (a policy node that does not fill camera_stamps cannot be monitored)"
        if any(int(k) == 0 for k in c.camera_stamps):
            return (
                "a camera's frames have zero header stamps: chunks cannot be matched to their frames (stamp the "
                "images at capture)"
            )
        unknown = [n for n in c.camera_names if n not in self.camera_names]
        if unknown:
            return f"chunk names camera(s) {unknown} the monitor does not subscribe to (cameras.names)"
        return ""

    def _match(self, now: float) -> None:
        """Move waiting chunks whose frames are all here to the job queue; expire the rest (lock held)."""
        still = deque(maxlen=self._waiting.maxlen)
        for t, chunk in self._waiting:
            if chunk.episode < self.episode:
                self.skipped += 1
                continue
            frames = {n: self.frames.get(n, k) for n, k in zip(chunk.camera_names, chunk.camera_stamps)}
            if all(f is not None for f in frames.values()):
                self._jobs.append(Job(chunk, frames, t))
                while len(self._jobs) > self.queue_depth:
                    self._jobs.popleft()
                    self.skipped += 1  # the reference could not keep up: the oldest waiting chunk is left out
            elif now - t > self.match_timeout:
                self.unmatched += 1
                missing = [n for n, f in frames.items() if f is None]
                self.last_problem = (
                    f"no frame of {', '.join(missing)} with the chunk's stamp (lost, or older than "
                    f"the {self.frames.keep:.1f} s buffer)"
                )
            else:
                still.append((t, chunk))
        self._waiting = still

    # -- the reference worker
    def next_job(self, now: float) -> Job | None:
        with self._lock:
            self._match(now)
            while self._jobs:
                job = self._jobs.popleft()
                if job.chunk.episode < self.episode:
                    self.skipped += 1
                    continue
                return job
        return None

    def finish(self, job: Job, reference: np.ndarray, latency: float = 0.0) -> DeviationResult | None:
        """Compare the policy's chunk with the reference's on the same observation; None when the chunk belongs to
        an episode that has ended meanwhile (counted as skipped)."""
        a = np.asarray(job.chunk.actions, dtype=np.float64)
        r = np.asarray(reference, dtype=np.float64)
        if r.shape != a.shape:
            raise ValueError(
                f"reference chunk has shape {r.shape}, the policy's {a.shape}: horizons or joints "
                "differ (the reference must be the same policy in full precision)"
            )
        d = a - r
        with self._lock:
            if job.chunk.episode < self.episode or job.chunk.episode < self._sum_episode:
                self.skipped += 1
                return None
            if job.chunk.episode != self._sum_episode:
                self._sum_episode = job.chunk.episode
                self._steps = 0
                self._cum[:] = 0.0
                self._cum_total = self._cum_first = 0.0
            first = [float(np.linalg.norm(d[0, s])) for s in self.slices]
            chunk = [float(np.linalg.norm(d[:, s])) for s in self.slices]
            first_total, chunk_total = float(np.linalg.norm(d[0])), float(np.linalg.norm(d))
            self._steps += 1
            self._cum += chunk
            self._cum_total += chunk_total
            self._cum_first += first_total
            self.compared += 1
            step, col = np.unravel_index(int(np.argmax(np.abs(d))), d.shape)
            return DeviationResult(
                stamp=job.chunk.stamp,
                header_ns=job.chunk.header_ns,
                episode=job.chunk.episode,
                episode_step=self._steps,
                model_id=job.chunk.model_id,
                arm_names=list(self.arm_names),
                first_action_l2=first,
                chunk_l2=chunk,
                cumulative_l2=[float(x) for x in self._cum],
                first_action_l2_total=first_total,
                chunk_l2_total=chunk_total,
                cumulative_l2_total=float(self._cum_total),
                cumulative_first_action_l2_total=float(self._cum_first),
                max_joint_deviation=float(abs(d[step, col])),
                max_joint_name=self.joint_names[int(col)],
                max_joint_step=int(step),
                reference_latency=float(latency),
                actions=a,
                reference=r,
            )

    def note_unmatched(self, why: str) -> None:
        """A job whose frames could not be used after all (e.g. a malformed image)."""
        with self._lock:
            self.unmatched += 1
            self.last_problem = why

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "compared": self.compared,
                "skipped": self.skipped,
                "unmatched": self.unmatched,
                "refused": self.refused,
                "waiting": len(self._waiting) + len(self._jobs),
                "buffered_frames": len(self.frames),
            }


# ---------------------------------------------------------------- tracking error
class TrackingError:
    """Commanded vs measured joint positions per arm: the newest command against the measured state closest to it
    in time (within max_gap). A large tracking error with a small action deviation is a controller problem."""

    def __init__(self, arm_names, max_gap: float = 0.1, history: int = 64):
        self.arm_names = list(arm_names)
        self.max_gap = float(max_gap)
        self._commands: dict[str, tuple[float, np.ndarray] | None] = {a: None for a in self.arm_names}
        self._states: dict[str, deque[tuple[float, np.ndarray]]] = {a: deque(maxlen=history) for a in self.arm_names}
        self._lock = threading.Lock()

    def add_command(self, arm: str, stamp: float, q) -> None:
        with self._lock:
            self._commands[arm] = (float(stamp), np.asarray(q, dtype=np.float64))

    def add_state(self, arm: str, stamp: float, q) -> None:
        with self._lock:
            self._states[arm].append((float(stamp), np.asarray(q, dtype=np.float64)))

    def latest(self) -> tuple[list[float], float]:
        """(per-arm L2 of commanded - measured, NaN where unknown; the largest stamp gap used, NaN if none)."""
        out, gaps = [], []
        with self._lock:
            for arm in self.arm_names:
                cmd, states = self._commands[arm], self._states[arm]
                if cmd is None or not states:
                    out.append(math.nan)
                    continue
                t, q = cmd
                ts, s = min(states, key=lambda x: abs(x[0] - t))
                if abs(ts - t) > self.max_gap or s.shape != q.shape:
                    out.append(math.nan)
                    continue
                out.append(float(np.linalg.norm(q - s)))
                gaps.append(abs(ts - t))
        return out, (max(gaps) if gaps else math.nan)


# ---------------------------------------------------------------- thresholds and the fallback
@dataclass(frozen=True)
class Check:
    name: str
    level: int
    value: float
    warn: float
    error: float
    message: str


class Thresholds:
    """Warning / error levels per quantity; a limit of 0 is off. `evaluate` gives one Check per quantity."""

    def __init__(self, limits: dict[str, tuple[float, float] | list[float]]):
        self.limits: dict[str, tuple[float, float]] = {}
        for name, pair in limits.items():
            if name not in QUANTITIES:
                raise ValueError(f"unknown deviation quantity {name!r}; known: {', '.join(QUANTITIES)}")
            warn, error = (float(x) for x in pair)
            if warn < 0 or error < 0 or (warn > 0 and error > 0 and warn > error):
                raise ValueError(
                    f"thresholds of {name}: [warn, error] = [{warn}, {error}] must be >= 0 with warn <= error (0 = off)"
                )
            self.limits[name] = (warn, error)

    def level(self, name: str, value: float) -> int:
        warn, error = self.limits.get(name, (0.0, 0.0))
        if value is None or not math.isfinite(value):
            return OK if value is None or math.isnan(value) else ERROR
        if error > 0 and value >= error:
            return ERROR
        if warn > 0 and value >= warn:
            return WARN
        return OK

    def evaluate(self, values: dict[str, float]) -> list[Check]:
        out = []
        for name in QUANTITIES:
            if name not in values:
                continue
            v = values[name]
            warn, error = self.limits.get(name, (0.0, 0.0))
            lvl = self.level(name, v)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                msg = "no value yet"
            elif lvl == ERROR:
                msg = f"{v:.4g} >= error limit {error:.4g}" if math.isfinite(v) else f"{v} (not finite)"
            elif lvl == WARN:
                msg = f"{v:.4g} >= warning limit {warn:.4g}"
            else:
                msg = f"{v:.4g}" + (f" (warning at {warn:.4g})" if warn > 0 else "")
            out.append(Check(name, lvl, float("nan") if v is None else float(v), warn, error, msg))
        return out


def deviation_values(result: DeviationResult | None, tracking: list[float] | None = None) -> dict[str, float]:
    """The thresholded quantities of a result (NaN before the first one)."""
    nan = math.nan
    v = {
        "first_action": result.first_action_l2_total if result else nan,
        "chunk": result.chunk_l2_total if result else nan,
        "cumulative": result.cumulative_l2_total if result else nan,
        "max_joint": result.max_joint_deviation if result else nan,
    }
    finite = [x for x in (tracking or []) if math.isfinite(x)]
    v["tracking"] = max(finite) if finite else nan
    return v


class FallbackTimer:
    """Asks for the fallback once the error level has held for `hold` seconds without a break; fires once."""

    def __init__(self, hold: float, enabled: bool = True):
        if hold < 0:
            raise ValueError(f"fallback hold time must be >= 0 s, got {hold}")
        self.hold = float(hold)
        self.enabled = bool(enabled)
        self.since: float | None = None  # when the current unbroken error run began
        self.fired_at: float | None = None

    def update(self, level: int, now: float) -> bool:
        """True exactly once: at the first update where the error level has held for `hold` s."""
        if not self.enabled or self.fired_at is not None:
            return False
        if level < ERROR:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        if now - self.since >= self.hold:
            self.fired_at = now
            return True
        return False

    def held_for(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since

    def state(self, now: float) -> str:
        if not self.enabled:
            return "off"
        if self.fired_at is not None:
            return "fired"
        if self.since is not None:
            return f"error held {self.held_for(now):.1f} of {self.hold:.1f} s"
        return "armed"


# ---------------------------------------------------------------- gripper paths (forward kinematics) and markers
# the simulated arms (gym-aloha's MuJoCo ALOHA scene): the same names as qvla_ros.sim.ik
SIM_ARM_JOINTS = tuple(
    f"vx300s_{arm}/{j}"
    for arm in ("left", "right")
    for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
)
SIM_TIP_BODIES = ("vx300s_left/gripper_link", "vx300s_right/gripper_link")
SIM_TIP_OFFSET = (0.15, 0.0, 0.0)


class GripperFK:
    """Fingertip positions of both arms for 14-dim joint vectors, from a MuJoCo model of the arms (default: the
    simulated rig's scene from gym-aloha; a real rig gives its own MJCF, e.g. the IMETA-Y1's). Per arm, the first
    six entries of its block of the joint vector drive `arm_joints` (six per arm, arm order); the gripper entry
    does not move the tip."""

    def __init__(
        self,
        model_path: str = "",
        arm_joints=SIM_ARM_JOINTS,
        tip_bodies=SIM_TIP_BODIES,
        tip_offset=SIM_TIP_OFFSET,
        n_arms: int = 2,
    ):
        import mujoco

        self._mj = mujoco
        if not model_path:
            from gym_aloha.constants import ASSETS_DIR

            from qvla_ros.sim.rig import ASSETS

            model_path = str(ASSETS_DIR / ASSETS["transfer_cube"])
        self.model_path = str(model_path)
        try:
            self.model = mujoco.MjModel.from_xml_path(self.model_path)
        except Exception as e:
            raise ValueError(f"cannot load the arm model {self.model_path}: {e}") from None
        self.data = mujoco.MjData(self.model)
        if len(arm_joints) != 6 * n_arms or len(tip_bodies) != n_arms:
            raise ValueError(
                f"give 6 joints per arm ({6 * n_arms}) and one tip body per arm ({n_arms}); got "
                f"{len(arm_joints)} and {len(tip_bodies)}"
            )
        try:
            ids = [self.model.joint(n).id for n in arm_joints]
            self.bodies = [self.model.body(b).id for b in tip_bodies]
        except KeyError as e:
            raise ValueError(f"the arm model {self.model_path} has no joint or body {e}") from None
        self.qadr = np.array([self.model.jnt_qposadr[i] for i in ids]).reshape(n_arms, 6)
        self.offset = np.asarray(tip_offset, dtype=np.float64).reshape(3)
        self.n_arms = n_arms

    def paths(self, actions: np.ndarray) -> list[np.ndarray]:
        """Per arm: [horizon, 3] fingertip positions (model world frame) along the chunk."""
        a = np.asarray(actions, dtype=np.float64)
        per = a.shape[1] // self.n_arms
        out = [np.empty((a.shape[0], 3)) for _ in range(self.n_arms)]
        m, d = self.model, self.data
        for k, row in enumerate(a):
            for i in range(self.n_arms):
                d.qpos[self.qadr[i]] = row[i * per : i * per + 6]
            self._mj.mj_kinematics(m, d)
            for i, b in enumerate(self.bodies):
                out[i][k] = d.xpos[b] + d.xmat[b].reshape(3, 3) @ self.offset
        return out


# RGBA per source: quantized warm, reference cool (distinct also for red-green colour blindness)
SOURCE_COLOURS = {"quantized": (1.0, 0.45, 0.0, 1.0), "reference": (0.1, 0.55, 1.0, 1.0)}
LINE_STRIP, SPHERE_LIST = 4, 7  # visualization_msgs/Marker types


def path_markers(
    paths: dict[str, list[np.ndarray]], arm_names, frame_id: str, line_width: float = 0.004, point_size: float = 0.012
) -> list[dict]:
    """Marker descriptions (visualization_msgs/Marker fields) for each source's per-arm paths.

    Namespaces `<source>/<arm>` (e.g. quantized/left), id 0 the path as a line strip, id 1 its points (the first
    one is where the chunk starts): the same ns/id every update, so each replaces its predecessor. Non-finite
    points are left out.
    """
    out = []
    for source in ("quantized", "reference"):
        for arm, pts in zip(arm_names, paths.get(source, [])):
            p = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
            p = p[np.isfinite(p).all(axis=1)]
            colour = SOURCE_COLOURS[source]
            common = {
                "ns": f"{source}/{arm}",
                "frame_id": frame_id,
                "color": colour,
                "points": [tuple(float(x) for x in q) for q in p],
            }
            out.append({**common, "id": 0, "type": LINE_STRIP, "scale": (line_width, 0.0, 0.0)})
            out.append({**common, "id": 1, "type": SPHERE_LIST, "scale": (point_size,) * 3})
    return out
