"""Chunk scheduler: time-indexed playback, latency compensation, interpolation and the three blending modes."""

import numpy as np
import pytest

from qvla_ros.control.scheduler import ChunkScheduler

DT = 1 / 30


def ramp(value, h=10, d=2, slope=0.0):
    return np.array([[value + slope * k] * d for k in range(h)], dtype=float)


def test_rows_are_looked_up_by_time_skipping_the_inference_latency():
    s = ChunkScheduler(2, mode="latest")
    assert s.add(ramp(0.0, slope=1.0), stamp=10.0, step_period=DT, now=10.1)  # 100 ms late: rows 0-2 passed
    target, first = s.target(10.1)
    assert target == pytest.approx([3.0, 3.0]) and first == [10.0]
    assert s.target(10.1 + DT)[0] == pytest.approx([4.0, 4.0]) and s.target(10.2)[1] == []


def test_other_policy_rates_are_interpolated():
    s = ChunkScheduler(1, mode="latest")
    s.add(ramp(0.0, h=5, d=1, slope=1.0), stamp=0.0, step_period=0.02, now=0.0)  # a 50 Hz policy
    assert s.target(DT)[0] == pytest.approx([DT / 0.02])


def test_a_chunk_runs_out():
    s = ChunkScheduler(2, mode="latest")
    s.add(ramp(1.0, h=3), stamp=0.0, step_period=DT, now=0.0)
    assert s.target(2 * DT)[0] is not None
    assert s.target(3 * DT)[0] is None
    assert s.horizon_left(3 * DT) < 0 or s.horizon_left(3 * DT) == 0


def test_chunks_that_arrive_after_their_end_are_refused():
    s = ChunkScheduler(2)
    assert not s.add(ramp(1.0, h=3), stamp=0.0, step_period=DT, now=1.0)
    assert not s.add(np.zeros((3, 5)), stamp=1.0, step_period=DT, now=1.0)  # wrong width
    assert s.rejected == 2 and len(s) == 0


def test_temporal_ensemble_weights_newer_chunks_by_decay():
    s = ChunkScheduler(2, mode="temporal_ensemble", decay=np.log(2) / 0.1, ramp=0.0)  # weight halves per 100 ms
    s.add(ramp(0.0, h=30), stamp=0.0, step_period=DT, now=0.0)
    s.add(ramp(3.0, h=30), stamp=0.1, step_period=DT, now=0.1)
    # weights 0.5 (old) and 1 (new): (0.5 * 0 + 1 * 3) / 1.5 = 2
    assert s.target(0.2)[0] == pytest.approx([2.0, 2.0])


def test_temporal_ensemble_plain_average_and_fade_in():
    s = ChunkScheduler(1, mode="temporal_ensemble", decay=0.0, ramp=0.1)
    s.add(ramp(0.0, h=30, d=1), stamp=0.0, step_period=DT, now=0.0)
    s.add(ramp(2.0, h=30, d=1), stamp=0.1, step_period=DT, now=0.2)
    assert s.target(0.2)[0] == pytest.approx([0.0])  # just arrived: weight 0
    assert s.target(0.25)[0] == pytest.approx([2.0 / 3.0])  # half faded in: weights 1, 0.5
    assert s.target(0.3)[0] == pytest.approx([1.0])  # plain average


def test_temporal_ensemble_drops_expired_chunks_and_caps_their_number():
    s = ChunkScheduler(1, mode="temporal_ensemble", max_chunks=3, ramp=0.0)
    for k in range(6):
        s.add(ramp(float(k), h=60, d=1), stamp=0.1 * k, step_period=DT, now=0.1 * k)
    assert len(s) == 3


def test_weighted_overlap_blends_old_plan_and_new_chunk():
    s = ChunkScheduler(1, mode="weighted_overlap", new_weight=0.25)
    s.add(ramp(0.0, h=10, d=1), stamp=0.0, step_period=DT, now=0.0)
    s.add(ramp(4.0, h=20, d=1), stamp=5 * DT, step_period=DT, now=5 * DT)
    assert s.target(6 * DT)[0] == pytest.approx([1.0])  # both cover: 0.75 * 0 + 0.25 * 4
    assert s.target(12 * DT)[0] == pytest.approx([4.0])  # the old plan ended at row 9 (t = 9 DT)
    assert len(s) == 1


def test_clear_and_bad_arguments():
    s = ChunkScheduler(2)
    s.add(ramp(1.0), stamp=0.0, step_period=DT, now=0.0)
    s.clear()
    assert s.target(0.0)[0] is None
    with pytest.raises(ValueError, match="blending mode"):
        ChunkScheduler(2, mode="average")
    with pytest.raises(ValueError):
        ChunkScheduler(2, new_weight=0.0)
