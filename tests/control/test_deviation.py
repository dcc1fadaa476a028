"""The monitor's logic without ROS: exact stamp matching of chunks to frames (out of order, skipped, lost), Eq. 4 per
chunk and Eq. 5 over the episode, thresholds, the fallback hold timer, the tracking error, forward kinematics of the
gripper paths and the marker descriptions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qvla_ros.control.deviation import (
    ERROR,
    LINE_STRIP,
    OK,
    SPHERE_LIST,
    WARN,
    ChunkRecord,
    DeviationMonitor,
    FallbackTimer,
    GripperFK,
    Thresholds,
    TrackingError,
    deviation_values,
    path_markers,
    stamp_ns,
)

JOINTS = [
    f"{arm}_{j}"
    for arm in ("left", "right")
    for j in ("joint1", "joint2", "joint3", "joint4", "joint5", "joint6", "gripper")
]
ARMS = ["left", "right"]
CAMS = ["top", "left_wrist", "right_wrist"]
H = 30
START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)


def frame_key(k: int, cam: int) -> int:
    return stamp_ns(100 + k, 1_000_000 * cam)  # per-camera stamps differ slightly, as real ones do


def chunk(k: int, episode: int = 0, actions=None, cams=CAMS) -> ChunkRecord:
    a = np.tile(START, (H, 1)) + 0.01 * k if actions is None else actions
    return ChunkRecord(
        stamp=100.0 + k,
        episode=episode,
        model_id="q",
        joint_names=JOINTS,
        actions=a,
        instruction="transfer the cube",
        camera_names=list(cams),
        camera_stamps=[frame_key(k, i) for i in range(len(cams))],
        state=START.copy(),
        header_ns=stamp_ns(100 + k, 0),
    )


def monitor(**kw) -> DeviationMonitor:
    return DeviationMonitor(JOINTS, ARMS, CAMS, **kw)


def add_frames(m: DeviationMonitor, k: int, received: float = 0.0) -> None:
    for i, cam in enumerate(CAMS):
        m.add_frame(cam, frame_key(k, i), received, ("frame", k, cam))  # the "message": what the frame is


def reference_for(job) -> np.ndarray:
    """A stand-in reference that depends only on the frames it is given: row offset = 0.001 x frame number."""
    ks = {f[1] for f in job.frames.values()}
    assert len(ks) == 1, f"a job mixes frames of different observations: {job.frames}"
    return np.tile(START, (H, 1)) + 0.001 * ks.pop()


def test_same_policy_on_both_sides_deviates_by_exactly_zero():
    m = monitor()
    for k in range(3):
        add_frames(m, k)
        m.add_chunk(chunk(k), now=0.0)
        job = m.next_job(0.0)
        r = m.finish(job, job.chunk.actions.copy())
        assert r.chunk_l2_total == 0.0 and r.first_action_l2_total == 0.0 and r.cumulative_l2_total == 0.0
        assert r.chunk_l2 == [0.0, 0.0] and r.cumulative_l2 == [0.0, 0.0] and r.max_joint_deviation == 0.0
        assert r.episode_step == k + 1 and r.header_ns == stamp_ns(100 + k, 0)


def test_eq4_per_chunk_and_eq5_running_sum_per_arm():
    rng = np.random.default_rng(0)
    m = monitor()
    total = first = 0.0
    per_arm = np.zeros(2)
    for k in range(5):
        add_frames(m, k)
        ref = np.tile(START, (H, 1)) + rng.normal(0, 0.01, (H, 14))
        q = ref + rng.normal(0, 0.02, (H, 14))
        m.add_chunk(chunk(k, actions=q), now=0.0)
        r = m.finish(m.next_job(0.0), ref, latency=0.05)
        d = q - ref
        assert r.chunk_l2_total == pytest.approx(np.linalg.norm(d)) and r.chunk_l2_total > 0
        assert r.first_action_l2_total == pytest.approx(np.linalg.norm(d[0]))
        assert r.chunk_l2 == pytest.approx([np.linalg.norm(d[:, :7]), np.linalg.norm(d[:, 7:])])
        assert r.first_action_l2 == pytest.approx([np.linalg.norm(d[0, :7]), np.linalg.norm(d[0, 7:])])
        total += np.linalg.norm(d)
        first += np.linalg.norm(d[0])
        per_arm += [np.linalg.norm(d[:, :7]), np.linalg.norm(d[:, 7:])]
        assert r.cumulative_l2_total == pytest.approx(total) and r.cumulative_first_action_l2_total == pytest.approx(
            first
        )
        assert r.cumulative_l2 == pytest.approx(per_arm)
        step, col = np.unravel_index(np.argmax(np.abs(d)), d.shape)
        assert (r.max_joint_deviation, r.max_joint_name, r.max_joint_step) == (abs(d[step, col]), JOINTS[col], step)
        assert r.reference_latency == 0.05
    assert m.counters()["compared"] == 5


def test_out_of_order_chunks_are_each_matched_to_their_own_frames():
    m = monitor(queue_depth=8)
    for k in range(6):
        add_frames(m, k)
    order = [3, 0, 5, 1, 4, 2]
    for k in order:
        m.add_chunk(chunk(k), now=0.0)
    seen = []
    while (job := m.next_job(0.0)) is not None:
        k = int(job.chunk.stamp - 100)
        assert {f[1] for f in job.frames.values()} == {k}  # the chunk's own frames, by exact stamp
        assert {n: f[2] for n, f in job.frames.items()} == {c: c for c in CAMS}
        r = m.finish(job, reference_for(job))
        expected = np.tile(START, (H, 1)) + 0.01 * k - (np.tile(START, (H, 1)) + 0.001 * k)
        assert r.chunk_l2_total == pytest.approx(np.linalg.norm(expected))
        seen.append(k)
    assert seen == order and m.counters()["skipped"] == 0


def test_a_reference_that_cannot_keep_up_skips_the_oldest_and_counts_them():
    m = monitor(queue_depth=1)
    for k in range(4):
        add_frames(m, k)
        m.add_chunk(chunk(k), now=0.0)
    job = m.next_job(0.0)
    assert job.chunk.stamp == 103.0  # the newest
    assert m.next_job(0.0) is None
    assert m.counters()["skipped"] == 3
    r = m.finish(job, reference_for(job))
    assert r.episode_step == 1 and m.counters()["compared"] == 1


def test_frames_arriving_after_the_chunk_within_the_timeout_still_match_else_unmatched():
    m = monitor(match_timeout=0.5)
    m.add_chunk(chunk(0), now=10.0)  # frames not here yet
    assert m.next_job(10.1) is None
    add_frames(m, 0, received=10.2)
    job = m.next_job(10.3)
    assert job is not None and job.chunk.stamp == 100.0
    m.add_chunk(chunk(1), now=11.0)  # its frames never come
    assert m.next_job(11.2) is None and m.counters()["unmatched"] == 0
    assert m.next_job(11.6) is None
    c = m.counters()
    assert c["unmatched"] == 1 and c["waiting"] == 0
    assert "no frame of top, left_wrist, right_wrist" in m.last_problem


def test_old_frames_leave_the_buffer():
    m = monitor(frame_buffer=1.0, match_timeout=0.0)
    add_frames(m, 0, received=0.0)
    add_frames(m, 1, received=0.5)
    add_frames(m, 2, received=1.2)  # frame 0 is now older than 1 s
    assert m.counters()["buffered_frames"] == 6
    m.add_chunk(chunk(0), now=1.3)
    m.add_chunk(chunk(1), now=1.3)
    job = m.next_job(1.4)
    assert job is not None and job.chunk.stamp == 101.0 and m.counters()["unmatched"] == 1


def test_a_new_episode_resets_the_sums_and_drops_chunks_of_the_old_one():
    m = monitor(queue_depth=4)
    for k in range(2):
        add_frames(m, k)
        m.add_chunk(chunk(k, episode=1), now=0.0)
        job = m.next_job(0.0)
        r = m.finish(job, job.chunk.actions + 0.01)
    assert r.episode_step == 2 and r.cumulative_l2_total == pytest.approx(2 * r.chunk_l2_total)
    add_frames(m, 2)
    add_frames(m, 3)
    m.add_chunk(chunk(2, episode=1), now=0.0)
    in_flight = m.next_job(0.0)  # taken by the worker before the START ...
    m.add_chunk(chunk(3, episode=2), now=0.0)  # ... the first chunk of the next episode arrives
    job = m.next_job(0.0)
    r2 = m.finish(job, job.chunk.actions + 0.02)
    assert (r2.episode, r2.episode_step) == (2, 1) and r2.cumulative_l2_total == pytest.approx(r2.chunk_l2_total)
    assert m.finish(in_flight, in_flight.chunk.actions) is None  # finished late: not counted in episode 2
    m.add_chunk(chunk(4, episode=1), now=0.0)  # a straggler of the old episode
    assert m.next_job(0.0) is None
    assert m.counters()["skipped"] == 2


@pytest.mark.parametrize(
    "change,match",
    [
        ({"joint_names": JOINTS[::-1]}, "joint names"),
        ({"actions": np.zeros((H, 13))}, "shape"),
        ({"state": np.zeros(0)}, "state values"),
        ({"camera_stamps": []}, "camera stamps"),
        ({"camera_stamps": [0, 0, 0]}, "zero header stamps"),
        ({"camera_names": ["top", "left_wrist", "side"]}, "does not subscribe"),
    ],
)
def test_chunks_that_cannot_be_monitored_are_refused_with_the_reason(change, match):
    m = monitor()
    c = chunk(0)
    for k, v in change.items():
        setattr(c, k, v)
    m.add_chunk(c, now=0.0)
    assert m.counters()["refused"] == 1 and match in m.last_problem and m.next_job(0.0) is None


def test_a_reference_of_another_shape_is_an_error():
    m = monitor()
    add_frames(m, 0)
    m.add_chunk(chunk(0), now=0.0)
    with pytest.raises(ValueError, match="horizons or joints differ"):
        m.finish(m.next_job(0.0), np.zeros((H - 1, 14)))


# ---------------------------------------------------------------- thresholds and the fallback
def test_thresholds_raise_the_right_levels():
    t = Thresholds(
        {
            "chunk": [0.5, 1.5],
            "first_action": [0.0, 0.3],
            "max_joint": [0.1, 0.0],
            "cumulative": [0.0, 0.0],
            "tracking": [0.3, 0.8],
        }
    )
    assert [t.level("chunk", v) for v in (0.0, 0.49, 0.5, 1.49, 1.5, 99.0)] == [OK, OK, WARN, WARN, ERROR, ERROR]
    assert [t.level("first_action", v) for v in (0.29, 0.3)] == [OK, ERROR]  # warning off
    assert [t.level("max_joint", v) for v in (0.09, 0.1, 50.0)] == [OK, WARN, WARN]  # error off
    assert t.level("cumulative", 1e9) == OK  # both off
    assert t.level("chunk", math.nan) == OK and t.level("chunk", math.inf) == ERROR
    checks = {
        c.name: c
        for c in t.evaluate(
            {"chunk": 2.0, "first_action": 0.1, "max_joint": 0.2, "cumulative": math.nan, "tracking": 0.4}
        )
    }
    assert checks["chunk"].level == ERROR and "error limit 1.5" in checks["chunk"].message
    assert checks["max_joint"].level == WARN and "warning limit 0.1" in checks["max_joint"].message
    assert checks["first_action"].level == OK and checks["cumulative"].message == "no value yet"
    assert checks["tracking"].level == WARN and (checks["tracking"].warn, checks["tracking"].error) == (0.3, 0.8)
    with pytest.raises(ValueError, match="warn <= error"):
        Thresholds({"chunk": [2.0, 1.0]})
    with pytest.raises(ValueError, match="unknown deviation quantity"):
        Thresholds({"speed": [1.0, 2.0]})


def test_deviation_values_take_the_worst_arm_for_tracking():
    m = monitor()
    add_frames(m, 0)
    m.add_chunk(chunk(0), now=0.0)
    job = m.next_job(0.0)
    r = m.finish(job, job.chunk.actions + 0.1)
    v = deviation_values(r, [0.2, math.nan])
    assert v["tracking"] == 0.2 and v["chunk"] == r.chunk_l2_total and v["max_joint"] == pytest.approx(0.1)
    assert all(math.isnan(x) for x in deviation_values(None, None).values())


def test_fallback_fires_after_the_hold_time_and_not_before():
    f = FallbackTimer(hold=2.0)
    assert not f.update(ERROR, 10.0)
    assert not f.update(ERROR, 11.0)
    assert not f.update(ERROR, 11.99)
    assert f.state(11.0) == "error held 1.0 of 2.0 s"
    assert f.update(ERROR, 12.0)  # held for exactly 2 s
    assert not f.update(ERROR, 13.0) and f.state(13.0) == "fired"  # once


def test_fallback_hold_restarts_when_the_error_breaks():
    f = FallbackTimer(hold=2.0)
    assert not f.update(ERROR, 0.0)
    assert not f.update(ERROR, 1.5)
    assert not f.update(WARN, 1.6)  # a break: the run starts again
    assert f.state(1.6) == "armed"
    assert not f.update(ERROR, 2.0)
    assert not f.update(ERROR, 3.9)
    assert f.update(ERROR, 4.0) and f.fired_at == 4.0


def test_fallback_off_never_fires_and_zero_hold_fires_at_once():
    off = FallbackTimer(hold=0.0, enabled=False)
    assert not any(off.update(ERROR, t) for t in range(10)) and off.state(0) == "off"
    now = FallbackTimer(hold=0.0)
    assert not now.update(WARN, 0.0) and now.update(ERROR, 0.5)
    with pytest.raises(ValueError):
        FallbackTimer(hold=-1.0)


# ---------------------------------------------------------------- tracking error
def test_tracking_error_compares_the_newest_command_with_the_closest_measured_state():
    t = TrackingError(ARMS, max_gap=0.05)
    assert all(math.isnan(x) for x in t.latest()[0])
    for k in range(10):
        t.add_state("left", 1.0 + 0.02 * k, np.full(7, 0.1 * k))
        t.add_state("right", 1.0 + 0.02 * k, np.zeros(7))
    t.add_command("left", 1.101, np.full(7, 0.5 + 0.3))  # closest state: k=5 at 1.10 (value 0.5)
    t.add_command("right", 5.0, np.zeros(7))  # no state within 50 ms
    l2, gap = t.latest()
    assert l2[0] == pytest.approx(np.sqrt(7) * 0.3) and math.isnan(l2[1]) and gap == pytest.approx(0.001)


# ---------------------------------------------------------------- forward kinematics and markers
@pytest.fixture(scope="module")
def fk():
    pytest.importorskip("mujoco")
    pytest.importorskip("gym_aloha")
    return GripperFK()


def test_gripper_paths_match_the_sim_arms_kinematics(fk):
    from qvla_ros.sim.ik import ArmKinematics

    rng = np.random.default_rng(1)
    a = np.tile(START, (H, 1)) + rng.normal(0, 0.1, (H, 14))
    left, right = fk.paths(a)
    assert left.shape == right.shape == (H, 3) and np.isfinite(left).all() and np.isfinite(right).all()
    ik_l, ik_r = ArmKinematics(fk.model, "left"), ArmKinematics(fk.model, "right")
    for k in (0, 17, H - 1):
        assert np.allclose(left[k], ik_l.fk(a[k, :6])[0]) and np.allclose(right[k], ik_r.fk(a[k, 7:13])[0])
    assert left[0, 0] < 0 < right[0, 0]  # the left arm stands at negative x in the scene
    assert not np.allclose(left[0], left[-1])  # the path moves


def test_fk_refuses_unknown_names():
    pytest.importorskip("mujoco")
    pytest.importorskip("gym_aloha")
    with pytest.raises(ValueError, match="no joint or body"):
        GripperFK(arm_joints=["nope"] * 12)
    with pytest.raises(ValueError, match="cannot load the arm model"):
        GripperFK(model_path="/nonexistent.xml")


def test_markers_are_well_formed_and_stable_across_updates(fk):
    updates = []
    for k in range(2):
        q = np.tile(START, (H, 1)) + 0.02 * k
        ref = q + 0.05
        updates.append(path_markers({"quantized": fk.paths(q), "reference": fk.paths(ref)}, ARMS, "world"))
    keys = [[(d["ns"], d["id"], d["type"]) for d in u] for u in updates]
    assert keys[0] == keys[1]  # same namespaces and ids every update: each replaces its predecessor
    assert sorted({ns for ns, _, _ in keys[0]}) == [
        "quantized/left",
        "quantized/right",
        "reference/left",
        "reference/right",
    ]
    assert {(i, t) for _, i, t in keys[0]} == {(0, LINE_STRIP), (1, SPHERE_LIST)}
    for d in updates[1]:
        assert d["frame_id"] == "world" and len(d["points"]) == H
        assert all(math.isfinite(c) for p in d["points"] for c in p)
        assert all(s > 0 for s in d["scale"][:1]) and len(d["color"]) == 4
    colours = {d["ns"].split("/")[0]: d["color"] for d in updates[0]}
    assert colours["quantized"] != colours["reference"]
    # the two sources draw different paths when the actions differ
    qpts = next(d for d in updates[0] if d["ns"] == "quantized/left" and d["id"] == 0)["points"]
    rpts = next(d for d in updates[0] if d["ns"] == "reference/left" and d["id"] == 0)["points"]
    assert not np.allclose(qpts, rpts)


def test_markers_leave_out_non_finite_points():
    pts = np.zeros((5, 3))
    pts[2] = np.nan
    pts[3, 1] = np.inf
    out = path_markers({"quantized": [pts, pts]}, ARMS, "base")
    assert len(out) == 4 and all(len(d["points"]) == 3 and d["frame_id"] == "base" for d in out)
