"""Plays action chunks out on the control clock and blends chunks that overlap in time (openpi's ActionChunkBroker
plays one chunk; lerobot's async inference and ACT blend several).

A chunk's row k is the target for time `stamp + k * step_period`, where `stamp` is the time of the observation it
was predicted from. The scheduler looks chunks up by time, not by row count, so:
  * inference latency is compensated: rows whose time has passed while the model ran are skipped;
  * a policy trained at another rate (π0 on ALOHA: 50 Hz) plays out correctly at 30 Hz (linear interpolation
    between rows).

Blending modes (parameter `control.blending`):
  latest             the newest chunk alone (no blending; a step where chunks switch).
  temporal_ensemble  every chunk that covers time t contributes, weighted w = exp(-decay * (newest_stamp - stamp))
                     (decay in 1/s; > 0 favours newer chunks, 0 is a plain average, < 0 favours older ones as
                     ACT does); a chunk fades in over `ramp` seconds after it arrives, so its arrival is no step.
  weighted_overlap   lerobot-style aggregation: when a chunk arrives, the plan becomes
                     (1 - new_weight) * old_plan + new_weight * new_chunk where both cover a time, the new chunk
                     where only it does; the rest of the old plan is dropped.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

BLENDING_MODES = ("latest", "temporal_ensemble", "weighted_overlap")


@dataclass
class _Plan:
    actions: np.ndarray  # [H, D]
    t0: float  # time of row 0
    dt: float  # s between rows
    arrived: float  # when it was added (fade-in reference)
    model_id: str = ""
    used: bool = False  # whether a command has been computed from it (for camera-to-command latency)

    @property
    def t_end(self) -> float:
        return self.t0 + (len(self.actions) - 1) * self.dt

    def covers(self, t: float, tolerance: float) -> bool:
        return self.t0 - tolerance <= t <= self.t_end + tolerance

    def at(self, t: float) -> np.ndarray:
        """Linear interpolation between rows; clamped to the first/last row just outside the span."""
        f = (t - self.t0) / self.dt
        if f <= 0:
            return self.actions[0]
        last = len(self.actions) - 1
        if f >= last:
            return self.actions[last]
        i = int(math.floor(f))
        a = f - i
        return (1.0 - a) * self.actions[i] + a * self.actions[i + 1]


class ChunkScheduler:
    """Thread-safe: the inference worker `add`s chunks, the control timer asks for `target(t)`."""

    def __init__(
        self,
        n_joints: int,
        mode: str = "temporal_ensemble",
        decay: float = 1.0,
        new_weight: float = 0.5,
        ramp: float = 0.1,
        max_chunks: int = 16,
    ):
        if mode not in BLENDING_MODES:
            raise ValueError(f"blending mode {mode!r} is not one of {', '.join(BLENDING_MODES)}")
        if not 0.0 < new_weight <= 1.0:
            raise ValueError(f"new_weight must be in (0, 1], got {new_weight}")
        if ramp < 0 or max_chunks < 1:
            raise ValueError(f"ramp must be >= 0 and max_chunks >= 1 (got {ramp}, {max_chunks})")
        self.n_joints = int(n_joints)
        self.mode = mode
        self.decay = float(decay)
        self.new_weight = float(new_weight)
        self.ramp = float(ramp)
        self.max_chunks = int(max_chunks)
        self._plans: list[_Plan] = []  # oldest first
        self._lock = threading.Lock()
        self.added = 0
        self.rejected = 0

    def add(self, actions: np.ndarray, stamp: float, step_period: float, now: float, model_id: str = "") -> bool:
        """Schedule a chunk predicted from an observation at `stamp`. False (and nothing changes) when it is
        malformed or has already run out at `now`."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.n_joints or a.shape[0] < 1 or not step_period > 0:
            self.rejected += 1
            return False
        plan = _Plan(a.copy(), float(stamp), float(step_period), float(now), model_id)
        if plan.t_end < now:
            self.rejected += 1  # arrived after its last row: inference took longer than the chunk lasts
            return False
        with self._lock:
            self.added += 1
            if self.mode == "latest":
                self._plans = [plan]
            elif self.mode == "temporal_ensemble":
                keep = [p for p in self._plans if p.t_end >= now] if self.max_chunks > 1 else []
                self._plans = keep[-(self.max_chunks - 1) :] + [plan] if keep else [plan]
            else:  # weighted_overlap
                self._plans = [self._merge(self._plans[-1], plan, now) if self._plans else plan]
        return True

    def _merge(self, old: _Plan, new: _Plan, now: float) -> _Plan:
        # Rows of the new chunk in the past are kept (the lookup skips them); only rows from `now` on are blended.
        merged = new.actions.copy()
        tol = 1e-9
        for k in range(len(merged)):
            t = new.t0 + k * new.dt
            if t >= now - new.dt and old.covers(t, tol):
                merged[k] = (1.0 - self.new_weight) * old.at(t) + self.new_weight * new.actions[k]
        return _Plan(merged, new.t0, new.dt, new.arrived, new.model_id)

    def target(self, t: float) -> tuple[np.ndarray | None, list[float]]:
        """The blended joint target for time t, or None when no chunk covers t.

        Also returns the stamps of chunks used for the first time (for camera-to-command latency)."""
        with self._lock:
            live = [p for p in self._plans if p.covers(t, 0.5 * p.dt)]
            if not live:
                return None, []
            first_use = [p.t0 for p in live if not p.used]
            for p in live:
                p.used = True
            if self.mode != "temporal_ensemble" or len(live) == 1:
                return live[-1].at(t).copy(), first_use
            newest = max(p.t0 for p in live)
            w = np.array([math.exp(-self.decay * (newest - p.t0)) for p in live])
            if self.ramp > 0:
                w *= np.array([min(1.0, max(0.0, (t - p.arrived) / self.ramp)) for p in live])
            if w.sum() <= 0:  # every chunk just arrived: nothing to fade from
                return live[-1].at(t).copy(), first_use
            rows = np.stack([p.at(t) for p in live])
            return (w[:, None] * rows).sum(0) / w.sum(), first_use

    def horizon_left(self, t: float) -> float:
        """Seconds of planned actions left after t (0 when nothing is planned)."""
        with self._lock:
            return max((p.t_end - t for p in self._plans), default=0.0) if self._plans else 0.0

    def clear(self) -> None:
        with self._lock:
            self._plans = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)
