"""Approximate-time synchronization of several camera streams, with a staleness limit (message_filters has no
wheel for the ROS 2 wheels, and its ApproximateTime policy emits every matched set, which a policy that infers
every few hundred ms does not need).

The policy asks for the *newest* set of frames, one per camera, whose header stamps lie within `slop` of each
other and that all arrived within `max_age` (on the node's clock) — `ApproxTimeSync.newest(now)`. Staleness uses
the receipt time, not the header stamp, so a camera whose clock is offset is still judged by when its frames
actually arrive. Matching uses the header stamps. Thread-safe: subscription callbacks `add`, the inference worker
and the control timer read.

A frame whose header stamp is not newer than its stream's previous one is ignored (counted as out of order). When
a stream's frames keep arriving with stamps behind the last accepted one for `restart_after` seconds (default:
max(1 s, 5 x max_age); a driver restarted its clock, or one frame carried a stamp far in the future), the stream
restarts its timeline from the new stamps (`resets` counts it) instead of being ignored for good. Meanwhile the
reasons say what is wrong: stamps going backwards while frames arrive, or streams out of sync, with each stream's
header-minus-receipt offset so that a clock mismatch between one camera and the others is plain.
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
        # frames ignored since the last accepted one: how many, the first one's receipt time, the newest's stamp
        self.ignored_run = 0
        self.ignored_since: float | None = None
        self.ignored_last: tuple[float, float] | None = None  # (stamp, received) of the newest ignored frame
        self.offset: float | None = None  # header stamp - receipt time of the newest accepted frame, s

    def add(self, stamp: float, received: float) -> bool:
        """Count a frame; False when it is older than (or as old as) the previous one and must be ignored."""
        if self._last_stamp is not None and stamp <= self._last_stamp:
            self.out_of_order += 1
            if self.ignored_run == 0:
                self.ignored_since = received
            self.ignored_run += 1
            self.ignored_last = (stamp, received)
            return False
        self.ignored_run, self.ignored_since, self.ignored_last = 0, None, None
        self.offset = stamp - received
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

    def restart_timeline(self) -> None:
        """Forget the last accepted stamp (its clock jumped): the next frame starts a new timeline."""
        self._last_stamp = None
        self._periods.clear()
        self.ignored_run, self.ignored_since, self.ignored_last = 0, None, None

    def backwards(self) -> str:
        """Why frames are being ignored, or '' when none is."""
        if not self.ignored_run or self.ignored_last is None or self._last_stamp is None:
            return ""
        back = self._last_stamp - self.ignored_last[0]
        return (
            f"frames arrive but their header stamps went backwards by {back:.3f} s "
            f"({self.ignored_run} ignored since the last accepted frame)"
        )


class ApproxTimeSync:
    """Newest approximately-synchronized set of frames from `names`, refusing sets older than `max_age`."""

    def __init__(
        self,
        names: list[str] | tuple[str, ...],
        slop: float,
        max_age: float,
        queue_size: int = 5,
        kind: str = "camera",
        restart_after: float | None = None,
    ):
        if not names:
            raise ValueError("ApproxTimeSync needs at least one stream name")
        if slop < 0 or max_age <= 0 or queue_size < 1:
            raise ValueError(
                f"slop must be >= 0, max_age > 0 and queue_size >= 1 (got {slop}, {max_age}, {queue_size})"
            )
        self.names = tuple(names)
        self.slop = float(slop)
        self.max_age = float(max_age)
        self.kind = kind
        self._restart_after = restart_after
        self._queues: dict[str, deque[Stamped]] = {n: deque(maxlen=queue_size) for n in self.names}
        self._stats = {n: _StreamStats() for n in self.names}
        self._lock = threading.Lock()
        self.unmatched = 0  # newest() calls where every stream was fresh but no set fell within slop
        self.resets = 0  # streams whose timeline restarted after their stamps went backwards for > max_age

    def add(self, name: str, stamp: float, received: float, msg: Any) -> None:
        with self._lock:
            st = self._stats[name]
            if not st.add(stamp, received):
                if received - st.ignored_since <= self.restart_after:
                    return  # not newer than the stream's previous frame: ignored
                # stamps have been behind the last accepted one for a long while (the node held, saying so): the
                # stream's clock restarted, or the last accepted stamp was bogus. Start its timeline over from here.
                st.restart_timeline()
                self._queues[name].clear()
                self.resets += 1
                st.add(stamp, received)
            self._queues[name].append(Stamped(float(stamp), float(received), msg))

    @property
    def restart_after(self) -> float:
        return self._restart_after if self._restart_after is not None else max(1.0, 5 * self.max_age)

    def ages(self, now: float) -> dict[str, float | None]:
        """Seconds since each stream's newest frame arrived (None: nothing yet)."""
        with self._lock:
            return {n: (now - q[-1].received) if q else None for n, q in self._queues.items()}

    def stale_by_name(self, now: float) -> dict[str, str]:
        """stream name -> why it is stale, for every stream with no usable message younger than max_age."""
        out = {}
        for name, age in self.ages(now).items():
            with self._lock:
                st = self._stats[name]
                back = st.backwards() if st.ignored_last and now - st.ignored_last[1] <= self.max_age else ""
            if back and (age is None or age > self.max_age):
                out[name] = f"{self.kind} '{name}': {back}"
            elif age is None:
                out[name] = f"{self.kind} '{name}': no message yet"
            elif age > self.max_age:
                out[name] = (
                    f"{self.kind} '{name}' stale: last message {age * 1e3:.0f} ms ago "
                    f"(limit {self.max_age * 1e3:.0f} ms)"
                )
        return out

    def offsets(self) -> dict[str, float | None]:
        """Per stream: header stamp - receipt time of its newest accepted frame, s (None: nothing yet)."""
        with self._lock:
            return {n: s.offset for n, s in self._stats.items()}

    def stale(self, now: float) -> list[str]:
        """Human-readable reasons for every stale stream (empty: all fresh)."""
        return list(self.stale_by_name(now).values())

    def newest(self, now: float, count: bool = True) -> SyncResult:
        """The newest synchronized set (see the module docstring). count=False: a status check that leaves the
        `unmatched` counter alone (the control tick asks every tick; the counter is for observation requests)."""
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
        if count:
            with self._lock:
                self.unmatched += 1
        newest = {n: max(s.stamp for s in frames) for n, frames in fresh.items()}
        ref = sorted(newest.values())[len(newest) // 2]
        behind = ", ".join(f"{n} {(t - ref) * 1e3:+.0f} ms" for n, t in newest.items())
        offsets = {n: o for n, o in self.offsets().items() if o is not None}
        why = (
            f"{self.kind}s out of sync: best spread {best_spread * 1e3:.0f} ms > slop {self.slop * 1e3:.0f} ms "
            f"(newest stamps vs the median: {behind})"
        )
        if offsets and max(offsets.values()) - min(offsets.values()) > max(self.slop, self.max_age):
            why += (
                "; header stamp - receipt time: "
                + ", ".join(f"{n} {o:+.3f} s" for n, o in offsets.items())
                + ": their clocks disagree (use one time source for every driver, or stamp on receipt)"
            )
        return SyncResult(False, reason=why)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per stream: frames, out_of_order, dropped (estimated), period (typical, s; 0 if unknown)."""
        with self._lock:
            return {
                n: {
                    "frames": s.frames,
                    "out_of_order": s.out_of_order,
                    "dropped": s.dropped,
                    "period": s.typical_period() or 0.0,
                }
                for n, s in self._stats.items()
            }

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
