"""A kinematic stand-in for the simulated rig: same interface as qvla_ros.sim.rig.SimRig (reset, command, step_to,
observe, episode_success, instruction, timing), no physics and no OpenGL.

Joints follow the latest command with a first-order lag; each camera image is a cheap pattern that changes with
the joint state (so a policy sees different inputs as the arms move). It costs well under a millisecond per frame,
which leaves the CPU to the policy node: the timing tests and benchmarks use it (`sim.backend: kinematic`) to
measure the node rather than MuJoCo's software renderer. Episodes never succeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.1] * 2)


@dataclass
class KinematicObservation:
    images: dict[str, np.ndarray]
    qpos: np.ndarray
    qvel: np.ndarray
    time: float
    reward: int = 0
    success: bool = False


class KinematicRig:
    def __init__(
        self,
        task: str = "transfer_cube",
        image_size: tuple[int, int] = (240, 320),
        camera_names: tuple[str, ...] = ("top", "left_wrist", "right_wrist"),
        control_hz: float = 50,
        command_hz: float = 30,
        seed: int | None = None,
        time_constant: float = 0.05,
    ):
        self.task = task
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.camera_names = tuple(camera_names)
        self.control_hz = float(control_hz)
        self.command_hz = float(command_hz)
        self.dt = 1.0 / self.control_hz
        self.instruction = "transfer the cube"
        self.time_constant = float(time_constant)
        h, w = self.image_size
        yy, xx = np.mgrid[0:h, 0:w]
        self._base = ((xx * 255) // max(w - 1, 1)).astype(np.uint8), ((yy * 255) // max(h - 1, 1)).astype(np.uint8)
        self.seed = seed
        self.commands = 0
        self.reset(seed)

    def reset(self, seed: int | None = None) -> KinematicObservation:
        self.seed = seed
        self._tick = 0
        self._q = START.copy()
        self._v = np.zeros(14)
        self._target = START.copy()
        self.commands = 0
        return self.observe()

    @property
    def time(self) -> float:
        return self._tick * self.dt

    @property
    def episode_success(self) -> bool:
        return False

    @property
    def max_reward_reached(self) -> int:
        return 0

    def command(self, q14, stamp: float | None = None) -> np.ndarray:
        q = np.asarray(q14, dtype=np.float64).reshape(-1)
        if q.shape != (14,) or not np.all(np.isfinite(q)):
            raise ValueError(f"a command has 14 finite entries, got {q}")
        self._target = q.copy()
        self.commands += 1
        return q.copy()

    def tick(self) -> None:
        a = min(1.0, self.dt / self.time_constant)
        new = self._q + a * (self._target - self._q)
        self._v = (new - self._q) / self.dt
        self._q = new
        self._tick += 1

    def step_to(self, t: float) -> int:
        n = 0
        while (self._tick + 1) * self.dt <= t + 1e-9:
            self.tick()
            n += 1
        return n

    def observe(self, render: bool = True) -> KinematicObservation:
        images = {}
        if render:
            gx, gy = self._base
            for i, name in enumerate(self.camera_names):
                shift = int((self._q[i % 14] + 3.2) * 40) % 256
                img = np.empty((*self.image_size, 3), np.uint8)
                img[..., 0] = gx + shift
                img[..., 1] = gy
                img[..., 2] = (i * 80 + self._tick) % 256
                images[name] = img
        return KinematicObservation(images, self._q.copy(), self._v.copy(), self.time)

    def timing(self):
        return None

    def close(self) -> None:
        pass
