"""The safety filter every command passes through: joint limits, maximum change per tick, finite values, and
hold-last-safe with reasons (stale cameras or arm states, a failed inference, an e-stop, nothing planned).

Limits come from the arm description file (config/y1_arms.yaml: one profile per rig, joints in rad, gripper as
normalized opening) in the 14-dim vector order of config/topics.yaml. The filter returns the command actually
sent, as lerobot's `Robot.send_action` does after clipping, together with why it held or clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ARM_DESCRIPTION_FILE = "y1_arms.yaml"


class ArmDescriptionError(ValueError):
    """The arm description file is missing, malformed, or has no such profile; the message says which."""


@dataclass(frozen=True)
class ArmDescription:
    """Limits of the whole rig in command-vector order (both arms share one profile)."""

    profile: str
    joint_names: tuple[str, ...]  # the 14 vector entries
    lower: np.ndarray
    upper: np.ndarray
    max_velocity: np.ndarray  # per entry, units per second
    gripper: dict = field(default_factory=dict)  # the profile's gripper block (stroke / SDK conversion)
    gripper_index: tuple[int, ...] = ()  # where grippers sit in the vector
    source: str = ""


def load_arm_description(
    path: str | Path, profile: str, joint_names: tuple[str, ...] | list[str], arms: int = 2
) -> ArmDescription:
    """Read `profile` from an arm description file (config/y1_arms.yaml format) for `arms` arms of 6 joints +
    gripper; `profile` may also be "real" or "sim" (the file's default_profile for that rig)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ArmDescriptionError(
            f"arm description {p} does not exist; set safety.arm_description to a "
            f"file like config/{ARM_DESCRIPTION_FILE}"
        ) from None
    except yaml.YAMLError as e:
        raise ArmDescriptionError(f"{p}: not valid YAML: {e}") from None
    profiles = (data or {}).get("profiles") or {}
    name = ((data or {}).get("default_profile") or {}).get(profile, profile)
    if name not in profiles:
        raise ArmDescriptionError(
            f"{p}: no arm profile {profile!r} (profiles: {', '.join(profiles) or 'none'}; "
            f"'real'/'sim' pick the file's default_profile); set safety.arm_profile"
        )
    prof = profiles[name]
    try:
        joints = prof["joints"]
        grip = prof["gripper"]
        lo = [float(j["lower"]) for j in joints] + [float(grip["lower"])]
        hi = [float(j["upper"]) for j in joints] + [float(grip["upper"])]
        vel = [float(prof["max_joint_velocity"])] * len(joints) + [float(grip["max_velocity"])]
    except (KeyError, TypeError, ValueError) as e:
        raise ArmDescriptionError(
            f"{p}: profile {name!r} needs joints[{{lower, upper}}], max_joint_velocity and "
            f"gripper{{lower, upper, max_velocity}} ({e})"
        ) from None
    per_arm = len(lo)
    if len(joint_names) != per_arm * arms:
        raise ArmDescriptionError(
            f"{p}: profile {name!r} describes {per_arm} entries per arm, but the command "
            f"vector has {len(joint_names)} for {arms} arms"
        )
    lower, upper = np.array(lo * arms), np.array(hi * arms)
    if np.any(lower >= upper) or np.any(np.array(vel) <= 0):
        raise ArmDescriptionError(f"{p}: profile {name!r} has a lower limit >= upper or a non-positive velocity")
    return ArmDescription(
        profile=name,
        joint_names=tuple(joint_names),
        lower=lower,
        upper=upper,
        max_velocity=np.array(vel * arms),
        gripper=dict(grip),
        gripper_index=tuple(per_arm * a + per_arm - 1 for a in range(arms)),
        source=str(p),
    )


def measured_state_problem(desc: ArmDescription, q: np.ndarray, start: int = 0, margin: float = 0.2) -> str:
    """'' when the measured values `q` (entries start..start+len(q) of the command vector) are finite and within
    the limits widened by `margin` x each joint's range; otherwise which joint is impossible and by how much.
    A finite but impossible reading (a driver reporting 100 rad) must not become a policy observation."""
    q = np.asarray(q, dtype=np.float64)
    idx = slice(start, start + q.size)
    names = desc.joint_names[idx]
    bad = np.flatnonzero(~np.isfinite(q))
    if bad.size:
        return "non-finite measured position for " + ", ".join(names[i] for i in bad)
    lo, hi = desc.lower[idx], desc.upper[idx]
    slack = margin * (hi - lo)
    out = np.flatnonzero((q < lo - slack) | (q > hi + slack))
    if out.size:
        i = int(out[0])
        return (
            f"measured {names[i]} = {q[i]:.4g} is outside its limits [{lo[i]:.4g}, {hi[i]:.4g}] by more than "
            f"{margin:g} of the range"
            + (f" (and {out.size - 1} more)" if out.size > 1 else "")
            + ": check the arm driver's units and joint order"
        )
    return ""


@dataclass
class Decision:
    """What the filter did on one tick."""

    command: np.ndarray | None  # None: nothing safe to send yet (no command ever, no arm state)
    held: bool
    reasons: dict[str, str]  # key -> text, e.g. {"camera:left_wrist": "camera 'left_wrist' stale: ..."}
    clipped: list[str] = field(default_factory=list)  # joints clipped to their limits
    rate_limited: bool = False
    changed: bool = False  # the set of hold reasons differs from the previous tick's

    @property
    def why(self) -> str:
        return "; ".join(self.reasons.values())


class SafetyFilter:
    """Limits, step limit and hold logic. Not thread-safe: the control timer alone calls `step`."""

    def __init__(self, desc: ArmDescription, rate_hz: float, step_scale: float = 1.0):
        if rate_hz <= 0 or step_scale <= 0:
            raise ValueError(f"rate_hz and step_scale must be > 0 (got {rate_hz}, {step_scale})")
        self.desc = desc
        self.max_step = desc.max_velocity / float(rate_hz) * float(step_scale)
        self.last: np.ndarray | None = None
        self._hold_keys: frozenset[str] | None = None
        self.ticks = 0
        self.held_ticks = 0
        self.clipped_ticks = 0
        self.rate_limited_ticks = 0

    def reset(self, q: np.ndarray | None = None) -> None:
        """Forget the last command (e.g. a new episode); the next command starts from `q` or the arm state."""
        self.last = None if q is None else self.clip(np.asarray(q, dtype=np.float64))[0]

    def clip(self, q: np.ndarray) -> tuple[np.ndarray, list[str]]:
        out = np.clip(q, self.desc.lower, self.desc.upper)
        names = [self.desc.joint_names[i] for i in np.flatnonzero(out != q)]
        return out, names

    def step(self, target: np.ndarray | None, reasons: dict[str, str], fallback: np.ndarray | None = None) -> Decision:
        """One tick. `target`: the planned command (None: nothing planned); `reasons`: hold reasons from the
        inputs (empty: all fine); `fallback`: the measured arm state, the command to hold when none was sent yet."""
        self.ticks += 1
        reasons = dict(reasons)
        target_ok = None
        if not reasons:
            if target is None:
                reasons["no_action"] = "no planned action covers now (waiting for the policy's next chunk)"
            else:
                t = np.asarray(target, dtype=np.float64)
                if t.shape != self.desc.lower.shape:
                    reasons["shape"] = f"target has shape {t.shape}, expected {self.desc.lower.shape}"
                elif not np.all(np.isfinite(t)):
                    bad = [self.desc.joint_names[i] for i in np.flatnonzero(~np.isfinite(t))]
                    reasons["non_finite"] = f"non-finite target for {', '.join(bad)}"
                else:
                    target_ok = t
        if self.last is None:
            if fallback is not None and np.shape(fallback) == self.desc.lower.shape and np.all(np.isfinite(fallback)):
                self.last = self.clip(np.asarray(fallback, dtype=np.float64))[0]
            else:
                reasons.setdefault("no_state", "no command sent yet and no arm state to hold")
                return self._decide(None, reasons)
        if reasons:
            return self._decide(self.last.copy(), reasons)
        clipped_target, clipped = self.clip(target_ok)
        delta = clipped_target - self.last
        limited = np.clip(delta, -self.max_step, self.max_step)
        command = self.last + limited
        self.last = command
        d = self._decide(command.copy(), {}, clipped=clipped, rate_limited=bool(np.any(limited != delta)))
        return d

    def _decide(self, command, reasons, clipped=(), rate_limited=False) -> Decision:
        keys = frozenset(reasons)
        changed = keys != self._hold_keys
        self._hold_keys = keys
        held = bool(reasons)
        self.held_ticks += held
        self.clipped_ticks += bool(clipped)
        self.rate_limited_ticks += rate_limited
        return Decision(command, held, reasons, list(clipped), rate_limited, changed)
