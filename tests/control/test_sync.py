"""Approximate-time synchronizer: newest matching set, slop, staleness, out-of-order and dropped frames."""

import pytest

from qvla_ros.control.sync import ApproxTimeSync, LatestStore

CAMS = ("top", "left_wrist", "right_wrist")


def feed(sync, t, offsets=(0.0, 0.0, 0.0), names=CAMS):
    for name, off in zip(names, offsets):
        sync.add(name, t + off, t + off + 0.002, f"{name}@{t + off:.3f}")


def test_newest_set_within_slop():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.1)
    for k in range(5):
        feed(s, k / 30, offsets=(0.0, 0.005, -0.004))
    r = s.newest(now=4 / 30 + 0.01)
    assert r.ok and r.spread <= 0.02
    assert {n: round(x.stamp * 30) for n, x in r.items.items()} == {n: 4 for n in CAMS}
    assert r.stamp == pytest.approx(4 / 30 + 0.005)


def test_falls_back_to_an_older_set_when_the_newest_frames_do_not_match():
    s = ApproxTimeSync(CAMS, slop=0.01, max_age=1.0)
    feed(s, 0.0)
    feed(s, 0.1, names=("top", "left_wrist"))  # right_wrist's 0.1 frame has not arrived yet
    s.add("right_wrist", -1e-3, 0.101, "late")  # out of order (older than its previous frame): ignored
    r = s.newest(now=0.11)
    assert r.ok and all(abs(x.stamp) < 0.01 for x in r.items.values())
    assert s.stats()["right_wrist"]["out_of_order"] == 1


def test_no_set_within_slop_says_so():
    s = ApproxTimeSync(CAMS, slop=0.005, max_age=1.0)
    feed(s, 0.0, offsets=(0.0, 0.03, 0.06))
    r = s.newest(now=0.1)
    assert not r.ok and "out of sync" in r.reason and s.unmatched == 1


def test_staleness_uses_arrival_time_and_names_the_camera():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.1)
    feed(s, 1.0)
    assert s.newest(now=1.05).ok
    s.add("top", 1.2, 1.2, "x")
    s.add("right_wrist", 1.2, 1.2, "x")
    r = s.newest(now=1.25)  # left_wrist's last frame arrived at 1.002: 248 ms ago
    assert not r.ok and "left_wrist" in r.reason and "stale" in r.reason and "top" not in r.reason
    assert s.stale(1.25) == [r.reason] and list(s.stale_by_name(1.25)) == ["left_wrist"]


def test_staleness_ignores_the_header_stamp_of_an_offset_camera_clock():
    # header stamps and arrival times disagree by far more than max_age: only the arrival time may count
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.1)
    # the cameras' clock lags the node's by 5 s: every frame's stamp is "5 s old" although it just arrived
    for k in range(3):
        for name in CAMS:
            s.add(name, 95.0 + k / 30, 100.0 + k / 30 + 0.002, f"{name}@{k}")
    now = 100.0 + 2 / 30 + 0.01
    r = s.newest(now)
    assert r.ok and s.stale(now) == [] and r.stamp == pytest.approx(95.0 + 2 / 30)
    assert all(a == pytest.approx(0.008) for a in s.ages(now).values())
    # the clock of one camera runs 5 s ahead instead: its stamps look fresh (even future), but its last frame
    # arrived 250 ms ago, so it is stale
    s = ApproxTimeSync(CAMS, slop=10.0, max_age=0.1)
    s.add("top", 200.0, 200.24, "x")
    s.add("left_wrist", 200.0, 200.24, "x")
    s.add("right_wrist", 205.0, 200.0, "ahead")
    r = s.newest(200.25)
    assert not r.ok and "right_wrist" in r.reason and "stale" in r.reason and "250 ms" in r.reason
    assert list(s.stale_by_name(200.25)) == ["right_wrist"]
    assert s.ages(200.25)["right_wrist"] == pytest.approx(0.25)
    # a new arrival from that camera makes it fresh again, its stamp still 5 s ahead
    s.add("right_wrist", 205.1, 200.245, "ahead, fresh")
    r = s.newest(200.25)
    assert r.ok and r.items["right_wrist"].msg == "ahead, fresh"


def test_missing_camera_is_reported():
    s = ApproxTimeSync(CAMS, slop=0.02, max_age=0.1)
    feed(s, 0.0, names=CAMS[:2])
    r = s.newest(now=0.01)
    assert not r.ok and "'right_wrist': no message yet" in r.reason


def test_dropped_frames_are_estimated_from_stamp_gaps():
    s = ApproxTimeSync(("top",), slop=0.0, max_age=1.0)
    stamps = [k / 30 for k in range(10)] + [k / 30 for k in range(13, 20)]  # frames 10, 11, 12 lost
    for t in stamps:
        s.add("top", t, t, None)
    st = s.stats()["top"]
    assert st["dropped"] == 3 and st["frames"] == len(stamps) and st["period"] == pytest.approx(1 / 30)


def test_latest_store():
    s = LatestStore(("left", "right"), max_age=0.2)
    s.add("left", 1.0, 1.0, "L1")
    s.add("left", 1.1, 1.1, "L2")
    assert s.latest()["left"].msg == "L2" and s.latest()["right"] is None
    assert s.stale(1.15) == ["arm state 'right': no message yet"]
    s.add("right", 1.1, 1.1, "R")
    assert s.stale(1.2) == [] and "left" in s.stale(1.5)[0]
    s.max_age = 1.0
    assert s.stale(1.5) == [] and s.max_age == 1.0 and s.kind == "arm state"


def test_bad_arguments():
    with pytest.raises(ValueError):
        ApproxTimeSync((), 0.1, 0.1)
    with pytest.raises(ValueError):
        ApproxTimeSync(CAMS, -1, 0.1)
