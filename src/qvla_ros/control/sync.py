"""Approximate-time synchronization of several camera streams, with a staleness limit (message_filters has no
wheel for the ROS 2 wheels, and its ApproximateTime policy emits every matched set, which a policy that infers
every few hundred ms does not need).

The policy asks for the *newest* set of frames, one per camera, whose header stamps lie within `slop` of each
other and that all arrived within `max_age` (on the node's clock) — `ApproxTimeSync.newest(now)`. Staleness uses
the receipt time, not the header stamp, so a camera whose clock is offset is still judged by when its frames
actually arrive. Matching uses the header stamps. Thread-safe: subscription callbacks `add`, the inference worker
and the control timer read.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stamped:
    stamp: float  # header stamp, s (matching)
    received: float  # receipt time on the node's clock, s (staleness)
    msg: Any


@dataclass
class SyncResult:
    ok: bool
    items: dict[str, Stamped] = field(default_factory=dict)  # stream name -> frame, when ok
    reason: str = ""  # why not ok
    spread: float = 0.0  # max - min header stamp of the set, s

    @property
    def stamp(self) -> float:
        """The newest header stamp in the set (the observation time)."""
        return max(s.stamp for s in self.items.values())


class _StreamStats:
    """Per-stream counters: frames, out-of-order frames, and frames missing judged from stamp gaps."""

    def __init__(self):
        self.frames = 0
        self.out_of_order = 0
        self.dropped = 0  # estimated from gaps in header stamps larger than 1.5 typical periods
        self._last_stamp: float | None = None
        self._periods: deque[float] = deque(maxlen=31)

    def add(self, stamp: float) -> bool:
        """Count a frame; False when it is older than (or as old as) the previous one and must be ignored."""
        if self._last_stamp is not None and stamp <= self._last_stamp:
            self.out_of_order += 1
            return False
        self.frames += 1
        if self._last_stamp is not None:
            gap = stamp - self._last_stamp
            if len(self._periods) >= 5:
                typical = sorted(self._periods)[len(self._periods) // 2]
                if typical > 0 and gap > 1.5 * typical:
                    self.dropped += int(round(gap / typical)) - 1
            self._periods.append(gap)
        self._last_stamp = stamp
        return True

    def typical_period(self) -> float | None:
        if len(self._periods) < 2:
            return None
        return sorted(self._periods)[len(self._periods) // 2]


class ApproxTimeSync:
    """Newest approximately-synchronized set of frames from `names`, refusing sets older than `max_age`."""

    def __init__(self, names: list[str] | tuple[str, ...], slop: float, max_age: float, queue_size: int = 5,
                 kind: str = "camera"):
        if not names:
            raise ValueError("ApproxTimeSync needs at least one stream name")
        if slop < 0 or max_age <= 0 or queue_size < 1:
            raise ValueError(f"slop must be >= 0, max_age > 0 and queue_size >= 1 "
                             f"(got {slop}, {max_age}, {queue_size})")
        self.names = tuple(names)
        self.slop = float(slop)
        self.max_age = float(max_age)
        self.kind = kind
        self._queues: dict[str, deque[Stamped]] = {n: deque(maxlen=queue_size) for n in self.names}
        self._stats = {n: _StreamStats() for n in self.names}
        self._lock = threading.Lock()
        self.unmatched = 0  # newest() calls where every stream was fresh but no set fell within slop

    def add(self, name: str, stamp: float, received: float, msg: Any) -> None:
        with self._lock:
            if self._stats[name].add(stamp):
                self._queues[name].append(Stamped(float(stamp), float(received), msg))

    def ages(self, now: float) -> dict[str, float | None]:
        """Seconds since each stream's newest frame arrived (None: nothing yet)."""
        with self._lock:
            return {n: (now - q[-1].received) if q else None for n, q in self._queues.items()}

    def stale_by_name(self, now: float) -> dict[str, str]:
        """stream name -> why it is stale, for every stream with no message younger than max_age."""
        out = {}
        for name, age in self.ages(now).items():
            if age is None:
                out[name] = f"{self.kind} '{name}': no message yet"
            elif age > self.max_age:
                out[name] = (f"{self.kind} '{name}' stale: last message {age * 1e3:.0f} ms ago "
                             f"(limit {self.max_age * 1e3:.0f} ms)")
        return out

    def stale(self, now: float) -> list[str]:
        """Human-readable reasons for every stale stream (empty: all fresh)."""
        return list(self.stale_by_name(now).values())

    def newest(self, now: float) -> SyncResult:
        stale = self.stale(now)
        if stale:
            return SyncResult(False, reason="; ".join(stale))
        with self._lock:
            fresh = {n: [s for s in q if now - s.received <= self.max_age] for n, q in self._queues.items()}
        # Each frame is a candidate pivot, newest first; every stream contributes its frame closest to the pivot.
        # The first pivot whose set fits within slop is the newest synchronized set.
        pivots = sorted((s for frames in fresh.values() for s in frames), key=lambda s: s.stamp, reverse=True)
        best_spread = None
        for pivot in pivots:
            items = {n: min(frames, key=lambda s: abs(s.stamp - pivot.stamp)) for n, frames in fresh.items()}
            stamps = [s.stamp for s in items.values()]
            spread = max(stamps) - min(stamps)
            if spread <= self.slop:
                return SyncResult(True, items=items, spread=spread)
            best_spread = spread if best_spread is None else min(best_spread, spread)
        with self._lock:
            self.unmatched += 1
        return SyncResult(False, reason=f"{self.kind}s out of sync: best spread {best_spread * 1e3:.0f} ms "
                                        f"> slop {self.slop * 1e3:.0f} ms")

    def stats(self) -> dict[str, dict[str, float]]:
        """Per stream: frames, out_of_order, dropped (estimated), period (typical, s; 0 if unknown)."""
        with self._lock:
            return {n: {"frames": s.frames, "out_of_order": s.out_of_order, "dropped": s.dropped,
                        "period": s.typical_period() or 0.0} for n, s in self._stats.items()}

    def clear(self) -> None:
        with self._lock:
            for q in self._queues.values():
                q.clear()


class LatestStore:
    """The newest message per stream (arm states, for example), with the same staleness rule as the cameras."""

    def __init__(self, names: list[str] | tuple[str, ...], max_age: float, kind: str = "arm state"):
        self._sync = ApproxTimeSync(names, slop=float("inf"), max_age=max_age, queue_size=1, kind=kind)
        self.names = self._sync.names

    def add(self, name: str, stamp: float, received: float, msg: Any) -> None:
        self._sync.add(name, stamp, received, msg)

    def ages(self, now: float) -> dict[str, float | None]:
        return self._sync.ages(now)

    def stale(self, now: float) -> list[str]:
        return self._sync.stale(now)

    def stale_by_name(self, now: float) -> dict[str, str]:
        return self._sync.stale_by_name(now)

    @property
    def max_age(self) -> float:
        return self._sync.max_age

    @max_age.setter
    def max_age(self, value: float) -> None:
        self._sync.max_age = float(value)

    @property
    def kind(self) -> str:
        return self._sync.kind

    def latest(self) -> dict[str, Stamped | None]:
        with self._sync._lock:
            return {n: (q[-1] if q else None) for n, q in self._sync._queues.items()}

    def stats(self) -> dict[str, dict[str, float]]:
        return self._sync.stats()
