"""The scripted teleoperator: plays the human on the leader arms, producing 30 Hz joint commands for both arms.

Transfer cube, planned as fingertip waypoints from the cube's pose (privileged sim state, what a human sees)
and turned into joint targets with differential IK at every command tick, in the joint-space task itself, so
what is recorded is exactly what was commanded and succeeded:

1. the right gripper, pointing straight down, takes the cube by two side faces and lifts it to a meeting point;
2. the left gripper, level and rolled 90 degrees, slides its fingers over the cube's top and bottom faces from
   the side, between the right fingers (the two pairs pinch different faces, so they never collide), and closes;
3. the right gripper opens and moves up; the left holds the cube in the air (reward 4).

    rig = SimRig(camera_names=())
    result = run_expert_episode(rig, seed=0)          # ExpertResult(success, max_reward, commands, ...)
    rate = evaluate_expert(range(50))                 # success rate over seeds
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from qvla_ros.sim.ik import ArmKinematics, slerp_matrix
from qvla_ros.sim.rig import ARM_QPOS, Observation, SimRig

CUBE_HALF = 0.02
# Gripper orientations as rotation matrices (columns: the gripper's x = pointing axis, y = pinch axis, z).
RIGHT_DOWN = np.column_stack([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
# Level, rolled 90 degrees: the left fingers close vertically, on the cube's top and bottom faces.
LEFT_LEVEL = np.column_stack([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
OPEN, CLOSED = 1.0, 0.0

EXPERT_VERSION = "transfer_cube/v1"


@dataclass
class Segment:
    """Move to `target` (fingertip position, gripper rotation) during [start, end] s, gripper ramped to `grip`.

    `target` is evaluated once, when the segment starts, from the rig's state at that moment (so a later phase
    can aim at where the cube really is, not where it was planned to be).
    """

    start: float
    end: float
    target: Callable[[SimRig], tuple[np.ndarray, np.ndarray]] | None  # None: stay
    grip: float


def _smooth(s: float) -> float:
    s = min(max(s, 0.0), 1.0)
    return s * s * (3.0 - 2.0 * s)


class _ArmScript:
    """Plays one arm's segments: interpolated fingertip pose -> IK -> joint target, plus the gripper."""

    def __init__(self, kin: ArmKinematics, segments: list[Segment], q0: np.ndarray, grip0: float):
        self.kin = kin
        self.segments = segments
        self.q = q0.copy()
        pos, rot = kin.fk(q0)
        self.pose0 = (pos, rot)  # pose at the start of the current segment
        self.goal = (pos, rot)
        self.grip0 = grip0
        self.grip = grip0
        self.active = -1
        self.max_ik_error = 0.0

    def step(self, rig: SimRig, t: float) -> np.ndarray:
        idx = self.active
        while idx + 1 < len(self.segments) and self.segments[idx + 1].start <= t + 1e-9:
            idx += 1
            seg = self.segments[idx]
            # The new segment starts from the previous goal (the commanded path is continuous).
            self.pose0 = self.goal
            self.grip0 = self.grip
            if seg.target is not None:
                self.goal = seg.target(rig)
        self.active = idx
        if idx < 0:
            return np.concatenate([self.q, [self.grip]])
        seg = self.segments[idx]
        s = _smooth((t - seg.start) / max(seg.end - seg.start, 1e-9))
        pos = self.pose0[0] + s * (self.goal[0] - self.pose0[0])
        rot = slerp_matrix(self.pose0[1], self.goal[1], s)
        self.q, ep, _ = self.kin.solve(self.q, pos, rot)
        if s >= 1.0:
            # Only waypoints must be exact; in transit the IK may trade a few mm for a calm wrist.
            self.max_ik_error = max(self.max_ik_error, ep)
        self.grip = self.grip0 + s * (seg.grip - self.grip0)
        return np.concatenate([self.q, [self.grip]])


class TransferCubeExpert:
    """Scripted bimanual handover for the transfer-cube task; call reset(rig) after rig.reset(), then act().

    Args:
        meet: where the right gripper brings the cube (fingertip position, m, world frame).
        duration: episode length in seconds (the script ends with ~1 s of the left arm holding the cube).
    """

    def __init__(self, meet=(0.0, 0.5, 0.25), duration: float = 8.0):
        self.meet = np.asarray(meet, dtype=np.float64)
        self.duration = float(duration)
        self._kin: dict[str, ArmKinematics] = {}

    # Fingertip targets, each computed from the sim state when its segment starts.
    def _cube(self, rig: SimRig) -> np.ndarray:
        return rig.object_poses()["cube"][:3].copy()

    def _right_above(self, rig):
        c = self._cube(rig)
        return np.array([c[0], c[1], CUBE_HALF + 0.09]), RIGHT_DOWN

    def _right_grasp(self, rig):
        c = self._cube(rig)
        # Fingertips 4 mm below the cube's centre, 16 mm above the table: a deep pinch that never scrapes the table.
        return np.array([c[0], c[1], CUBE_HALF - 0.004]), RIGHT_DOWN

    def _right_lift(self, rig):
        c = self._cube(rig)
        return np.array([c[0], c[1], 0.12]), RIGHT_DOWN

    def _right_meet(self, rig):
        return self.meet.copy(), RIGHT_DOWN

    def _right_retreat(self, rig):
        return self.meet + np.array([0.10, 0.0, 0.05]), RIGHT_DOWN

    def _left_standby(self, rig):
        return self.meet + np.array([-0.20, 0.0, -0.06]), LEFT_LEVEL

    def _left_pregrasp(self, rig):
        c = self._cube(rig)
        return np.array([c[0] - 0.10, c[1], c[2]]), LEFT_LEVEL

    def _left_grasp(self, rig):
        c = self._cube(rig)
        return np.array([c[0] + 0.01, c[1], c[2]]), LEFT_LEVEL

    def _left_hold(self, rig):
        c = self._cube(rig)
        return np.array([c[0] - 0.05, c[1], c[2]]), LEFT_LEVEL

    def segments(self) -> dict[str, list[Segment]]:
        """Both arms' timelines (s). The left waits until the cube is on its way, so the arms never meet early."""
        right = [
            Segment(0.0, 1.3, self._right_above, OPEN),
            Segment(1.3, 2.1, self._right_grasp, OPEN),
            Segment(2.1, 2.6, None, CLOSED),
            Segment(2.6, 3.2, self._right_lift, CLOSED),
            Segment(3.2, 4.0, self._right_meet, CLOSED),
            Segment(4.0, 5.9, None, CLOSED),
            Segment(5.9, 6.4, None, OPEN),
            Segment(6.4, 7.0, self._right_retreat, OPEN),
        ]
        left = [
            Segment(0.0, 2.5, None, CLOSED),
            Segment(2.5, 3.8, self._left_standby, OPEN),
            Segment(4.1, 4.7, self._left_pregrasp, OPEN),
            Segment(4.7, 5.3, self._left_grasp, OPEN),
            Segment(5.3, 5.8, None, CLOSED),
            Segment(6.8, 7.4, self._left_hold, CLOSED),
        ]
        return {"left": left, "right": right}

    def reset(self, rig: SimRig) -> None:
        """Plan for the rig's current episode (call right after rig.reset())."""
        if rig.task != "transfer_cube":
            raise ValueError(f"TransferCubeExpert scripts the transfer_cube task, not {rig.task!r}")
        if not self._kin or next(iter(self._kin.values())).model is not rig.model:
            self._kin = {arm: ArmKinematics(rig.model, arm) for arm in ("left", "right")}
        q = rig.qpos()
        segs = self.segments()
        grip = {"left": q[6], "right": q[13]}
        self._arms = {
            arm: _ArmScript(self._kin[arm], segs[arm], rig.data.qpos[ARM_QPOS[arm]].copy(), grip[arm])
            for arm in ("left", "right")
        }

    def act(self, rig: SimRig, t: float) -> np.ndarray:
        """The 14-dim joint command for sim time t (left 6 + gripper, right 6 + gripper)."""
        return np.concatenate([self._arms["left"].step(rig, t), self._arms["right"].step(rig, t)])

    @property
    def max_ik_error(self) -> float:
        """Largest fingertip error (m) of the IK at a reached waypoint in the last episode."""
        return max(a.max_ik_error for a in self._arms.values())


@dataclass
class ExpertResult:
    seed: int
    success: bool  # reward 4 reached
    success_at_end: bool  # and still 4 at the last tick
    max_reward: int
    commands: np.ndarray  # float[T, 14], one per command tick
    command_times: np.ndarray  # float[T], s


def command_times(duration: float, command_hz: float) -> np.ndarray:
    """The command ticks of an episode: k / command_hz for k = 0 .. duration * command_hz - 1."""
    return np.arange(int(round(duration * command_hz))) / command_hz


def run_expert_episode(
    rig: SimRig,
    seed: int,
    expert: TransferCubeExpert | None = None,
    on_tick: Callable[[float, Observation, np.ndarray], None] | None = None,
    render: bool = True,
    on_physics: Callable[[SimRig], None] | None = None,
) -> ExpertResult:
    """Play one scripted episode at the rig's command rate.

    Each command tick t: the physics advances to t (`on_physics(rig)` after reset and after every 50 Hz tick),
    the expert observes, then sends its command, as a human on the leader arms reacts to what they see;
    `on_tick(t, obs, command)` sees each.
    """
    expert = expert or TransferCubeExpert()
    rig.reset(seed=seed)
    expert.reset(rig)
    if on_physics is not None:
        on_physics(rig)
    times = command_times(expert.duration, rig.command_hz)
    cmds = np.zeros((len(times), 14))
    for k, t in enumerate(times):
        rig.step_to(t, on_physics)
        obs = rig.observe(render=render)
        cmds[k] = rig.command(expert.act(rig, t), stamp=t)
        if on_tick is not None:
            on_tick(t, obs, cmds[k])
    # Let the physics run to the end of the last command period.
    rig.step_to(expert.duration, on_physics)
    return ExpertResult(
        seed=seed,
        success=rig.episode_success,
        success_at_end=bool(rig.observe(render=False).success),
        max_reward=rig.max_reward_reached,
        commands=cmds,
        command_times=times,
    )


def evaluate_expert(
    seeds: Iterable[int],
    task: str = "transfer_cube",
    progress: Callable[[ExpertResult], None] | None = None,
) -> list[ExpertResult]:
    """Run the expert on each seed without cameras (physics only); returns every episode's result."""
    results = []
    with SimRig(task=task, camera_names=()) as rig:
        expert = TransferCubeExpert()
        for seed in seeds:
            r = run_expert_episode(rig, seed, expert, render=False)
            results.append(r)
            if progress is not None:
                progress(r)
    return results
