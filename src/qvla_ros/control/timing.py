"""Timing monitors for fixed-rate loops (after lerobot's CycleTimer: a loop that silently runs below its rate is
a bug, so every loop reports rate, period jitter, overruns and how long its sections took).

    rate = RateMonitor(expected_hz=30)      rate.tick(now) every cycle; rate.summary() -> dict
    lat = LatencyStats()                    lat.add(seconds); lat.summary() -> {"p50", "p99", "max", ...}
    cycle = CycleTimer(30)                  with cycle.section("safety"): ...; cycle.end(now)
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

import numpy as np


def percentiles(values, qs=(50, 99)) -> dict[str, float]:
    """{"p50": ..., "p99": ..., "max": ..., "mean": ..., "n": ...} of `values` (zeros when empty)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {**{f"p{q}": 0.0 for q in qs}, "max": 0.0, "mean": 0.0, "n": 0}
    out = {f"p{q}": float(np.percentile(v, q)) for q in qs}
    out.update(max=float(v.max()), mean=float(v.mean()), n=int(v.size))
    return out


class LatencyStats:
    """A rolling window of durations (s)."""

    def __init__(self, window: int = 300):
        self._values: deque[float] = deque(maxlen=window)
        self.count = 0
        self.last = 0.0

    def add(self, seconds: float) -> None:
        self._values.append(float(seconds))
        self.count += 1
        self.last = float(seconds)

    def summary(self) -> dict[str, float]:
        return percentiles(self._values)

    def clear(self) -> None:
        self._values.clear()


class RateMonitor:
    """Tick times of a loop that should run at `expected_hz`: rate over a window, period percentiles, period error
    against the nominal period, and overruns (periods longer than `overrun_factor` nominal periods)."""

    def __init__(self, expected_hz: float, window: int = 300, overrun_factor: float = 1.5):
        if expected_hz <= 0:
            raise ValueError(f"expected_hz must be > 0, got {expected_hz}")
        self.expected_hz = float(expected_hz)
        self.period = 1.0 / self.expected_hz
        self.overrun_factor = overrun_factor
        self._times: deque[float] = deque(maxlen=window + 1)
        self.ticks = 0
        self.overruns = 0
        self.max_period = 0.0

    def tick(self, now: float) -> float | None:
        """Record a tick at `now` (s, monotonic); returns the period since the previous tick."""
        dt = None
        if self._times:
            dt = now - self._times[-1]
            if dt > self.overrun_factor * self.period:
                self.overruns += 1
            self.max_period = max(self.max_period, dt)
        self._times.append(now)
        self.ticks += 1
        return dt

    def rate(self) -> float:
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0

    def periods(self) -> np.ndarray:
        return np.diff(np.asarray(self._times, dtype=np.float64))

    def summary(self) -> dict[str, float]:
        p = self.periods()
        err = np.abs(p - self.period)
        s = percentiles(p)
        return {
            "rate_hz": self.rate(),
            "period_p50": s["p50"],
            "period_p99": s["p99"],
            "period_max": s["max"],
            "period_error_p50": float(np.percentile(err, 50)) if err.size else 0.0,
            "period_error_p99": float(np.percentile(err, 99)) if err.size else 0.0,
            "overruns": self.overruns,
            "ticks": self.ticks,
        }


class CycleTimer:
    """Sectioned timing of one loop body, with a slow-tick count (a tick whose body took longer than
    `slow_fraction` of the period)."""

    def __init__(self, rate_hz: float, slow_fraction: float = 0.5, window: int = 300):
        self.budget = slow_fraction / float(rate_hz)
        self.sections: dict[str, LatencyStats] = {}
        self.total = LatencyStats(window)
        self.slow_ticks = 0
        self._start: float | None = None
        self._window = window

    def begin(self) -> None:
        self._start = time.perf_counter()

    @contextmanager
    def section(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sections.setdefault(name, LatencyStats(self._window)).add(time.perf_counter() - t)

    def end(self) -> float:
        """Close the tick; returns the body's duration (s)."""
        if self._start is None:
            return 0.0
        d = time.perf_counter() - self._start
        self._start = None
        self.total.add(d)
        if d > self.budget:
            self.slow_ticks += 1
        return d

    def summary(self) -> dict[str, float]:
        out = {
            "body_p50": self.total.summary()["p50"],
            "body_p99": self.total.summary()["p99"],
            "slow_ticks": self.slow_ticks,
        }
        for name, st in self.sections.items():
            out[f"{name}_p99"] = st.summary()["p99"]
        return out
