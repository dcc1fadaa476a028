"""Rate, jitter and latency monitors."""

import numpy as np
import pytest

from qvla_ros.control.timing import CycleTimer, LatencyStats, RateMonitor, percentiles


def test_rate_monitor_steady_and_overrun():
    m = RateMonitor(30.0)
    t = 0.0
    for k in range(61):
        m.tick(t)
        t += 1 / 30 if k != 30 else 3 / 30  # one late tick
    s = m.summary()
    assert s["overruns"] == 1 and s["ticks"] == 61
    assert s["period_max"] == pytest.approx(0.1) and s["period_p50"] == pytest.approx(1 / 30)
    assert s["rate_hz"] == pytest.approx(60 / (t - 1 / 30), rel=1e-6)


def test_latency_stats_and_percentiles():
    st = LatencyStats(window=100)
    for v in np.linspace(0.0, 1.0, 101):
        st.add(v)
    s = st.summary()
    assert s["n"] == 100 and s["max"] == pytest.approx(1.0) and s["p50"] == pytest.approx(0.505)
    assert percentiles([])["n"] == 0


def test_cycle_timer_sections():
    c = CycleTimer(30.0, slow_fraction=1e-9)
    c.begin()
    with c.section("safety"):
        sum(range(1000))
    c.end()
    s = c.summary()
    assert s["slow_ticks"] == 1 and "safety_p99" in s and s["body_p50"] > 0
