"""Scripted teleoperators for the simulated rig's leader-arm command stream. No ROS here.

The sim rig node (`sim.teleop: true`) calls `act(rig, t)` at the command rate and publishes the result on the
command topics, exactly where a Y1 leader arm's joint states arrive on the real rig (through the output adapter,
`config/topics.yaml`'s /qvla/master_arm_{left,right}/joint_states by default); the rig then follows those messages
like any command. So a recording made through the ROS graph in simulation takes the same path as on the robot.

    teleop = make_teleop(rig)            # TransferCubeExpert on the MuJoCo rig, SweepTeleop on the kinematic one
    teleop.reset(rig)                    # after rig.reset()
    q14 = teleop.act(rig, rig.time)      # left 6 + gripper, right 6 + gripper
"""

from __future__ import annotations

import numpy as np

TELEOP_KINDS = ("scripted",)


class SweepTeleop:
    """For the kinematic rig (no physics, no objects): every joint sweeps smoothly around the start pose and the
    grippers open and close, so that recorded commands, states and images all change over an episode."""

    def __init__(self, duration: float = 8.0, amplitude: float = 0.3, period: float = 4.0):
        self.duration = float(duration)
        self.amplitude = float(amplitude)
        self.period = float(period)
        self._q0 = None

    def reset(self, rig) -> None:
        self._q0 = np.asarray(rig.observe(render=False).qpos, dtype=np.float64).copy()

    def act(self, rig, t: float) -> np.ndarray:
        if self._q0 is None:
            self.reset(rig)
        phase = 2 * np.pi * min(t, self.duration) / self.period
        q = self._q0.copy()
        for arm in (0, 1):
            for j in range(6):
                q[arm * 7 + j] += self.amplitude * np.sin(phase + 0.7 * j + np.pi * arm) * (1.0 if j < 3 else 0.5)
            q[arm * 7 + 6] = 0.5 + 0.5 * np.cos(phase + np.pi * arm)
        return q


def make_teleop(rig, kind: str = "scripted"):
    """The scripted teleoperator for `rig`: the transfer-cube expert on the MuJoCo rig, a sweep on the kinematic
    one. ValueError (naming the task) when there is none for the rig's task."""
    if kind not in TELEOP_KINDS:
        raise ValueError(f"teleop kind {kind!r} is not one of {', '.join(TELEOP_KINDS)}")
    if not hasattr(rig, "model"):  # the kinematic stand-in: no scene to script against
        return SweepTeleop()
    if rig.task != "transfer_cube":
        raise ValueError(
            f"no scripted teleoperator for task {rig.task!r} (only transfer_cube); set sim.teleop "
            "false and drive the rig from your own node"
        )
    from qvla_ros.sim.expert import TransferCubeExpert

    return TransferCubeExpert()
