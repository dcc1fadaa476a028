"""The simulated two-arm rig: gym-aloha's MuJoCo ALOHA scene as a stand-in for the IMETA-Y1 pair.

Two 6-DoF arms with parallel grippers, three cameras (top + two wrist cameras), physics at 50 Hz (10 x 2 ms
substeps) driven by 30 Hz joint commands, held or interpolated between arrivals. No ROS here: the sim node, the
recorder, the tests and the policy evaluation all use this class.

    rig = SimRig(task="transfer_cube", image_size=(240, 320), seed=0)
    obs = rig.reset(seed=0)            # Observation: images, qpos[14], qvel[14], time, reward, success
    rig.command(q14)                   # latest 30 Hz target (left 6 + gripper, right 6 + gripper)
    rig.step_to(1 / 30)                # advance the 50 Hz physics up to (not past) t = 1/30 s
    obs = rig.observe()
    print(rig.timing())                # step/render wall time, command ages and intervals

Vectors follow config/topics.yaml: [left_joint1..6, left_gripper, right_joint1..6, right_gripper], joints in
rad, grippers as normalized opening (0 closed .. 1 open). The model comes straight from gym-aloha's assets
through the `mujoco` bindings (not the gym wrapper, which renders three 480x640 images every step); rendering
is made cheap: no multisampling, no shadows or reflections, one offscreen context for all cameras.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import mujoco
import numpy as np

from qvla_ros import sim as _sim  # sets the headless GL default before mujoco is first imported

ASSETS = {
    "transfer_cube": "bimanual_viperx_transfer_cube.xml",
    "insertion": "bimanual_viperx_insertion.xml",
}
INSTRUCTIONS = {
    "transfer_cube": "pick up the red cube with the right arm and hand it over to the left arm",
    "insertion": "pick up the peg and the socket and insert the peg into the socket",
}
# The scene's cameras by the rig's names (the real rig's external camera is called `top` here too).
CAMERAS = {
    "top": "top",
    "left_wrist": "left_wrist",
    "right_wrist": "right_wrist",
    "angle": "angle",
    "front_close": "front_close",
}
DEFAULT_CAMERAS = ("top", "left_wrist", "right_wrist")
JOINT_NAMES = (
    "left_joint1",
    "left_joint2",
    "left_joint3",
    "left_joint4",
    "left_joint5",
    "left_joint6",
    "left_gripper",
    "right_joint1",
    "right_joint2",
    "right_joint3",
    "right_joint4",
    "right_joint5",
    "right_joint6",
    "right_gripper",
)
# gym-aloha's start pose and its puppet finger stroke (one finger's slide joint, m) for normalized opening 0..1.
START_ARM_QPOS = (0.0, -0.96, 1.16, 0.0, -0.3, 0.0)
START_FINGER = 0.02239
FINGER_CLOSED, FINGER_OPEN = 0.01844, 0.05800
MAX_REWARD = 4
ARM_QPOS = {"left": slice(0, 6), "right": slice(8, 14)}  # the arms' joints in qpos/qvel (fingers at 6,7 / 14,15)
FINGER_QPOS = {"left": 6, "right": 14}


class RigError(RuntimeError):
    """The simulated rig cannot do what was asked; the message says what to change."""


def finger_from_normalized(g):
    return FINGER_CLOSED + np.asarray(g, dtype=np.float64) * (FINGER_OPEN - FINGER_CLOSED)


def normalized_from_finger(x):
    return (np.asarray(x, dtype=np.float64) - FINGER_CLOSED) / (FINGER_OPEN - FINGER_CLOSED)


def sample_object_poses(task: str, seed: int | None) -> np.ndarray:
    """The objects' initial poses (xyz + wxyz quaternion each) for `seed`, exactly as gym-aloha samples them."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    if task == "transfer_cube":
        return sample_box_pose(seed)
    return np.concatenate(sample_insertion_pose(seed))


@dataclass
class Observation:
    """What the rig's sensors report at one instant (sim time `time`, seconds since reset)."""

    images: dict[str, np.ndarray]  # camera name -> uint8 HxWx3 RGB
    qpos: np.ndarray  # float64[14]: left 6 joints (rad) + gripper opening, right 6 + gripper
    qvel: np.ndarray  # float64[14]: rad/s, gripper in normalized units/s
    time: float
    reward: int  # task reward now (0..4)
    success: bool  # reward == 4 now


@dataclass
class _Stat:
    """A bounded window of samples with summary statistics (ms unless said otherwise)."""

    values: deque = field(default_factory=lambda: deque(maxlen=100_000))

    def add(self, v: float) -> None:
        self.values.append(v)

    def summary(self) -> dict[str, float]:
        if not self.values:
            return {"n": 0}
        a = np.asarray(self.values)
        return {
            "n": int(a.size),
            "mean": float(a.mean()),
            "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)),
            "max": float(a.max()),
        }


@dataclass
class RigTiming:
    """Per-episode timing report: wall time of physics and rendering, sim-time age of the commands."""

    step_ms: dict  # wall time of one 50 Hz control tick (10 physics substeps + reward)
    render_ms: dict  # wall time of one observe() with rendering (all cameras)
    command_age_ms: dict  # sim time since the latest command, sampled at every tick
    command_interval_ms: dict  # sim time between consecutive commands
    ticks: int
    commands: int
    stale_ticks: int  # ticks whose latest command was older than 2.5 command periods
    control_hz: float
    command_hz: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        def f(d):
            return "n/a" if not d.get("n") else f"mean {d['mean']:.2f} p95 {d['p95']:.2f} max {d['max']:.2f}"

        return (
            f"step [ms]: {f(self.step_ms)} | render [ms]: {f(self.render_ms)} | "
            f"command age [ms]: {f(self.command_age_ms)} | command interval [ms]: {f(self.command_interval_ms)} | "
            f"ticks {self.ticks}, commands {self.commands}, stale ticks {self.stale_ticks}"
        )


class SimRig:
    """The simulated two-arm rig (see the module docstring for the whole API in five lines).

    Args:
        task: "transfer_cube" (success: the left gripper holds the cube in the air) or "insertion".
        image_size: (height, width) of every camera image.
        camera_names: which cameras observe() renders, in order; () for no rendering (no GL needed).
        control_hz: physics control rate; must divide the 500 Hz physics rate (50 -> 10 substeps).
        command_hz: nominal rate of command() calls, used to interpolate and to flag stale commands.
        seed: seeds reset(seed=None) draws; reset(seed=k) is reproducible whatever this is.
        command_mode: "interpolate" (ramp linearly from the previous to the latest command over one command
            period: smooth, one period of delay) or "hold" (jump to the latest command at the next tick).
        wrist_fovy: vertical field of view of the wrist cameras in degrees (the scene's 20 is a telephoto).

    Not thread-safe: rendering reads the MjData that tick() writes, so a node that renders in another thread
    must serialize the calls (the GL context is made current on every render, so any one thread may render).
    Sim time only advances through tick()/step_to(): the caller decides whether that follows the wall clock.
    """

    def __init__(
        self,
        task: str = "transfer_cube",
        image_size: tuple[int, int] = (240, 320),
        camera_names: tuple[str, ...] = DEFAULT_CAMERAS,
        control_hz: float = 50,
        command_hz: float = 30,
        seed: int | None = None,
        command_mode: str = "interpolate",
        wrist_fovy: float = 60.0,
    ):
        if task not in ASSETS:
            raise RigError(f"unknown task {task!r}; choose one of: {', '.join(ASSETS)}")
        h, w = (int(image_size[0]), int(image_size[1]))
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise RigError(f"image_size {image_size!r} must be (height, width) between 8 and 4096 pixels")
        unknown = [c for c in camera_names if c not in CAMERAS]
        if unknown:
            raise RigError(f"unknown camera(s) {unknown}; the scene has: {', '.join(CAMERAS)}")
        if command_mode not in ("interpolate", "hold"):
            raise RigError(f"command_mode {command_mode!r} must be 'interpolate' or 'hold'")
        if command_hz <= 0:
            raise RigError(f"command_hz must be positive, got {command_hz}")

        from gym_aloha.constants import ASSETS_DIR

        self.task = task
        self.image_size = (h, w)
        self.camera_names = tuple(camera_names)
        self.command_mode = command_mode
        self.command_hz = float(command_hz)
        self.joint_names = JOINT_NAMES
        self.instruction = INSTRUCTIONS[task]
        self.max_reward = MAX_REWARD

        self.model = mujoco.MjModel.from_xml_path(str(ASSETS_DIR / ASSETS[task]))
        self.data = mujoco.MjData(self.model)
        substeps = round(1.0 / (control_hz * self.model.opt.timestep))
        if substeps < 1 or abs(substeps * self.model.opt.timestep * control_hz - 1.0) > 1e-6:
            raise RigError(
                f"control_hz={control_hz} does not divide the physics rate "
                f"{1 / self.model.opt.timestep:.0f} Hz; use e.g. 50, 100 or 250"
            )
        self.substeps = substeps
        self.control_hz = float(control_hz)
        self.dt = substeps * self.model.opt.timestep

        # Cheap rendering: no multisampling; shadows and reflections off below, on the scene.
        self.model.vis.quality.offsamples = 0
        self.model.light_castshadow[:] = 0
        for cam in ("left_wrist", "right_wrist"):
            self.model.cam_fovy[self.model.camera(cam).id] = wrist_fovy
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, h)
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, w)
        self._renderer = None

        self._ctrl_low = self.model.actuator_ctrlrange[:, 0].copy()
        self._ctrl_high = self.model.actuator_ctrlrange[:, 1].copy()
        self._geom = {name: self.model.geom(name).id for name in self._reward_geoms()}
        self._rng = np.random.default_rng(seed)
        self.seed: int | None = None
        self._tick = 0
        self._reset_stats()

    # ---------------------------------------------------------------- episode
    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode: arms at the start pose, objects placed for `seed` (drawn if None)."""
        if seed is None:
            seed = int(self._rng.integers(0, 2**31 - 1))
        self.seed = int(seed)
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        start = np.array([*START_ARM_QPOS, START_FINGER, -START_FINGER] * 2)
        d.qpos[:16] = start
        d.ctrl[:] = start
        d.qpos[16:] = sample_object_poses(self.task, self.seed)
        mujoco.mj_forward(m, d)
        self._tick = 0
        q = self.qpos()
        # Until the first command arrives, hold the start pose.
        self._cmd_prev = q.copy()
        self._cmd_last = q.copy()
        self._cmd_time = 0.0
        self._n_commands = 0
        self._reward = self._compute_reward()
        self._max_reward = self._reward
        self._frame_tick = -1
        self._frames: dict[str, np.ndarray] = {}
        self._reset_stats()
        return self.observe()

    @property
    def time(self) -> float:
        """Sim time in seconds since reset (a multiple of 1/control_hz)."""
        return self._tick * self.dt

    @property
    def episode_success(self) -> bool:
        """Whether the task's maximum reward was reached at any tick since reset."""
        return self._max_reward >= MAX_REWARD

    @property
    def max_reward_reached(self) -> int:
        return int(self._max_reward)

    # ---------------------------------------------------------------- commands and physics
    def command(self, q14, stamp: float | None = None) -> np.ndarray:
        """Set the latest joint target (14-dim, arm order left then right; see module docstring).

        `stamp` is the command's sim time (default: now). Returns the command as it will be applied: each entry
        clipped to the simulated joint's range, grippers to 0..1.
        """
        q = np.asarray(q14, dtype=np.float64).reshape(-1)
        if q.shape != (14,):
            raise RigError(f"a command has 14 entries (left 6 + gripper, right 6 + gripper), got shape {q.shape}")
        if not np.all(np.isfinite(q)):
            raise RigError(f"command contains NaN or inf: {q}")
        q = self._clip_command(q)
        now = self.time if stamp is None else float(stamp)
        if self._n_commands:
            self._interval.add((now - self._cmd_time) * 1e3)
        # Interpolation starts from where the previous ramp had got to, so a command arriving early is smooth.
        self._cmd_prev = self._target_at(now)
        self._cmd_last = q
        self._cmd_time = now
        self._n_commands += 1
        return q.copy()

    def tick(self) -> None:
        """Advance one control period (1/control_hz): set the actuator targets, run the physics substeps."""
        t0 = time.perf_counter()
        t_end = (self._tick + 1) * self.dt
        target = self._target_at(t_end)
        self.data.ctrl[:] = np.clip(self._to_ctrl(target), self._ctrl_low, self._ctrl_high)
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        self._tick += 1
        self._reward = self._compute_reward()
        self._max_reward = max(self._max_reward, self._reward)
        self._step.add((time.perf_counter() - t0) * 1e3)
        age = self.time - self._cmd_time
        self._age.add(age * 1e3)
        if self._n_commands and age > 2.5 / self.command_hz:
            self._stale += 1

    @property
    def next_tick_time(self) -> float:
        """Sim time at the end of the next tick."""
        return (self._tick + 1) * self.dt

    def step_to(self, t: float, on_tick: Callable[[SimRig], None] | None = None) -> int:
        """Tick until the next tick would pass sim time `t`; returns the number of ticks run.

        `on_tick(rig)` runs after every tick (a recorder samples the 50 Hz joint states there).
        """
        n = 0
        while self.next_tick_time <= t + 1e-9:
            self.tick()
            n += 1
            if on_tick is not None:
                on_tick(self)
        return n

    def _target_at(self, t: float) -> np.ndarray:
        if self.command_mode == "hold" or self._n_commands == 0:
            return self._cmd_last.copy()
        alpha = np.clip((t - self._cmd_time) * self.command_hz, 0.0, 1.0)
        return self._cmd_prev + alpha * (self._cmd_last - self._cmd_prev)

    def _clip_command(self, q: np.ndarray) -> np.ndarray:
        q = q.copy()
        for i in range(2):
            lo = self._ctrl_low[i * 8 : i * 8 + 6]
            hi = self._ctrl_high[i * 8 : i * 8 + 6]
            q[i * 7 : i * 7 + 6] = np.clip(q[i * 7 : i * 7 + 6], lo, hi)
            q[i * 7 + 6] = np.clip(q[i * 7 + 6], 0.0, 1.0)
        return q

    @staticmethod
    def _to_ctrl(q: np.ndarray) -> np.ndarray:
        gl, gr = finger_from_normalized(q[6]), finger_from_normalized(q[13])
        return np.concatenate([q[0:6], [gl, -gl], q[7:13], [gr, -gr]])

    # ---------------------------------------------------------------- sensing
    def qpos(self) -> np.ndarray:
        d = self.data
        return np.concatenate(
            [
                d.qpos[ARM_QPOS["left"]],
                [normalized_from_finger(d.qpos[FINGER_QPOS["left"]])],
                d.qpos[ARM_QPOS["right"]],
                [normalized_from_finger(d.qpos[FINGER_QPOS["right"]])],
            ]
        )

    def qvel(self) -> np.ndarray:
        d = self.data
        scale = 1.0 / (FINGER_OPEN - FINGER_CLOSED)
        return np.concatenate(
            [
                d.qvel[ARM_QPOS["left"]],
                [d.qvel[FINGER_QPOS["left"]] * scale],
                d.qvel[ARM_QPOS["right"]],
                [d.qvel[FINGER_QPOS["right"]] * scale],
            ]
        )

    def object_poses(self) -> dict[str, np.ndarray]:
        """Privileged state for scripted experts: each free object's pose (xyz + wxyz quaternion)."""
        q = self.data.qpos
        if self.task == "transfer_cube":
            return {"cube": q[16:23].copy()}
        return {"peg": q[16:23].copy(), "socket": q[23:30].copy()}

    def observe(self, render: bool = True) -> Observation:
        """The current observation; images are rendered once per tick (repeated calls reuse them)."""
        images: dict[str, np.ndarray] = {}
        if render and self.camera_names:
            if self._frame_tick != self._tick:
                t0 = time.perf_counter()
                self._frames = {c: self._render(c) for c in self.camera_names}
                self._frame_tick = self._tick
                self._render_ms.add((time.perf_counter() - t0) * 1e3)
            images = {c: im.copy() for c, im in self._frames.items()}
        return Observation(
            images=images,
            qpos=self.qpos(),
            qvel=self.qvel(),
            time=self.time,
            reward=int(self._reward),
            success=bool(self._reward >= MAX_REWARD),
        )

    def render(self, camera: str) -> np.ndarray:
        """One camera image now (uint8 HxWx3), any scene camera, whether in camera_names or not."""
        if camera not in CAMERAS:
            raise RigError(f"unknown camera {camera!r}; the scene has: {', '.join(CAMERAS)}")
        return self._render(camera)

    def _render(self, camera: str) -> np.ndarray:
        r = self._get_renderer()
        r.update_scene(self.data, camera=CAMERAS[camera])
        return r.render()

    def _get_renderer(self):
        if self._renderer is None:
            h, w = self.image_size
            try:
                r = mujoco.Renderer(self.model, height=h, width=w)
            except Exception as e:  # the GL backends raise a variety of types
                raise RigError(_gl_error_message(e)) from e
            for flag in (
                mujoco.mjtRndFlag.mjRND_SHADOW,
                mujoco.mjtRndFlag.mjRND_REFLECTION,
                mujoco.mjtRndFlag.mjRND_SKYBOX,
            ):
                r.scene.flags[flag] = 0
            self._renderer = r
        return self._renderer

    # ---------------------------------------------------------------- reward
    def _reward_geoms(self) -> list[str]:
        fingers = ["vx300s_left/10_left_gripper_finger", "vx300s_right/10_right_gripper_finger"]
        if self.task == "transfer_cube":
            return ["red_box", "table", *fingers]
        return ["red_peg", "pin", "table", *fingers, "socket-1", "socket-2", "socket-3", "socket-4"]

    def _contacts(self) -> set[tuple[int, int]]:
        n = self.data.ncon
        if n == 0:
            return set()
        c = self.data.contact
        g1, g2 = c.geom1[:n], c.geom2[:n]
        return {(int(a), int(b)) for a, b in zip(g1, g2)} | {(int(b), int(a)) for a, b in zip(g1, g2)}

    def _compute_reward(self) -> int:
        """gym-aloha's staged reward (same contact rules, by geom id instead of names for speed)."""
        pairs = self._contacts()
        g = self._geom
        left_finger, right_finger = g["vx300s_left/10_left_gripper_finger"], g["vx300s_right/10_right_gripper_finger"]
        if self.task == "transfer_cube":
            box = g["red_box"]
            touch_left = (box, left_finger) in pairs
            touch_right = (box, right_finger) in pairs
            touch_table = (box, g["table"]) in pairs
            reward = 0
            if touch_right:
                reward = 1
            if touch_right and not touch_table:
                reward = 2
            if touch_left:
                reward = 3
            if touch_left and not touch_table:
                reward = 4
            return reward
        peg, sockets = g["red_peg"], [g[f"socket-{i}"] for i in range(1, 5)]
        touch_right = (peg, right_finger) in pairs
        touch_left = any((s, left_finger) in pairs for s in sockets)
        peg_table = (peg, g["table"]) in pairs
        socket_table = any((s, g["table"]) in pairs for s in sockets)
        peg_socket = any((peg, s) in pairs for s in sockets)
        reward = 0
        if touch_left and touch_right:
            reward = 1
        if touch_left and touch_right and not peg_table and not socket_table:
            reward = 2
        if peg_socket and not peg_table and not socket_table:
            reward = 3
        if (peg, g["pin"]) in pairs:
            reward = 4
        return reward

    # ---------------------------------------------------------------- timing and lifetime
    def _reset_stats(self) -> None:
        self._step, self._render_ms, self._age, self._interval = _Stat(), _Stat(), _Stat(), _Stat()
        self._stale = 0

    def timing(self) -> RigTiming:
        """Timing since the last reset (see RigTiming)."""
        return RigTiming(
            step_ms=self._step.summary(),
            render_ms=self._render_ms.summary(),
            command_age_ms=self._age.summary(),
            command_interval_ms=self._interval.summary(),
            ticks=self._tick,
            commands=self._n_commands,
            stale_ticks=self._stale,
            control_hz=self.control_hz,
            command_hz=self.command_hz,
        )

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> SimRig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gl_error_message(e: Exception) -> str:
    backend = os.environ.get("MUJOCO_GL", "")
    hint = ""
    if _sim.MUJOCO_IMPORTED_FIRST and not _sim.GL_WAS_SET:
        hint = (
            " (mujoco was imported before qvla_ros.sim.rig could choose a backend: set MUJOCO_GL before "
            "starting Python)"
        )
    return (
        f"no OpenGL backend could render offscreen (MUJOCO_GL={backend or 'unset'}){hint}: {type(e).__name__}: {e}. "
        "Headless: MUJOCO_GL=egl needs libEGL (Mesa: apt install libegl1 libgl1-mesa-dri), MUJOCO_GL=osmesa needs "
        "libosmesa6; with a display, MUJOCO_GL=glfw. Or run without cameras: SimRig(camera_names=())."
    )
