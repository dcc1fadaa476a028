"""Differential inverse kinematics for the simulated arms (damped least squares on a private MjData).

The scripted teleoperator plans fingertip poses and turns them into joint targets here, so what it commands
(and what is recorded) is joint positions, like a leader arm's.
"""

from __future__ import annotations

import mujoco
import numpy as np

ARM_JOINTS = {
    "left": [f"vx300s_left/{j}" for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")],
    "right": [
        f"vx300s_right/{j}" for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
    ],
}
# The fingertip centre in the gripper_link frame (x points from the wrist to the fingers, y is the pinch axis).
TIP_OFFSET = np.array([0.15, 0.0, 0.0])


def rotation_error(r_target: np.ndarray, r_current: np.ndarray) -> np.ndarray:
    """World-frame rotation vector that turns r_current into r_target."""
    qt, qc, dq = np.empty(4), np.empty(4), np.empty(3)
    mujoco.mju_mat2Quat(qt, r_target.reshape(-1))
    mujoco.mju_mat2Quat(qc, r_current.reshape(-1))
    mujoco.mju_subQuat(dq, qt, qc)  # in r_current's frame
    return r_current @ dq


def slerp_matrix(r0: np.ndarray, r1: np.ndarray, s: float) -> np.ndarray:
    """Rotation a fraction s of the way from r0 to r1 (shortest arc)."""
    rv = rotation_error(r1, r0) * float(s)
    q_delta, q0, q = np.empty(4), np.empty(4), np.empty(4)
    angle = np.linalg.norm(rv)
    if angle < 1e-12:
        return r0.copy()
    mujoco.mju_axisAngle2Quat(q_delta, rv / angle, angle)
    mujoco.mju_mat2Quat(q0, r0.reshape(-1))
    mujoco.mju_mulQuat(q, q_delta, q0)
    out = np.empty(9)
    mujoco.mju_quat2Mat(out, q)
    return out.reshape(3, 3)


class ArmKinematics:
    """Forward and inverse kinematics of one arm's fingertip point, on a copy of the model's data."""

    def __init__(self, model: mujoco.MjModel, arm: str):
        self.model = model
        self.data = mujoco.MjData(model)
        self.arm = arm
        ids = [model.joint(n).id for n in ARM_JOINTS[arm]]
        self.qadr = np.array([model.jnt_qposadr[i] for i in ids])
        self.dadr = np.array([model.jnt_dofadr[i] for i in ids])
        self.low = model.jnt_range[ids, 0].copy()
        self.high = model.jnt_range[ids, 1].copy()
        self.body = model.body(f"vx300s_{arm}/gripper_link").id
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def fk(self, q6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fingertip position (world) and gripper_link rotation matrix for arm joints q6."""
        d = self.data
        d.qpos[self.qadr] = q6
        mujoco.mj_kinematics(self.model, d)
        r = d.xmat[self.body].reshape(3, 3).copy()
        return d.xpos[self.body] + r @ TIP_OFFSET, r

    def solve(
        self,
        q_seed: np.ndarray,
        pos: np.ndarray,
        rot: np.ndarray,
        iters: int = 30,
        rot_weight: float = 0.3,
        damping: float = 0.02,
        tol_pos: float = 2e-4,
        tol_rot: float = 2e-3,
        posture_weight: float = 0.05,
    ) -> tuple[np.ndarray, float, float]:
        """Joint positions near q_seed that put the fingertip at `pos` with orientation `rot`.

        Returns (q6, position error [m], rotation error [rad]) of the last iterate.
        """
        m, d = self.model, self.data
        q = np.clip(np.asarray(q_seed, dtype=np.float64).copy(), self.low, self.high)
        ep = er = np.inf
        for _ in range(iters):
            d.qpos[self.qadr] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            r = d.xmat[self.body].reshape(3, 3)
            tip = d.xpos[self.body] + r @ TIP_OFFSET
            e_pos = pos - tip
            e_rot = rotation_error(rot, r)
            ep, er = float(np.linalg.norm(e_pos)), float(np.linalg.norm(e_rot))
            if ep < tol_pos and er < tol_rot:
                break
            mujoco.mj_jac(m, d, self._jacp, self._jacr, tip, self.body)
            # A weak pull of the forearm roll toward zero: near a straight wrist, forearm roll and wrist rotate
            # turn about the same axis, and without it they wind up against each other (a null motion that shows
            # as a sudden spin of both joints).
            roll_row = np.zeros((1, 6))
            roll_row[0, 3] = posture_weight
            jac = np.vstack([self._jacp[:, self.dadr], rot_weight * self._jacr[:, self.dadr], roll_row])
            err = np.concatenate([e_pos, rot_weight * e_rot, [-posture_weight * q[3]]])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(7), err)
            step = np.abs(dq).max()
            if step > 0.2:
                dq *= 0.2 / step
            q = np.clip(q + dq, self.low, self.high)
        return q, ep, er
