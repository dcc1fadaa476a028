"""Inference worker: the pipe protocol (no pickle), the driver loop, reload, and both backends on a real policy."""

import io
import threading
import time

import numpy as np
import pytest

from qvla_ros.control.worker import (
    InferenceWorker,
    PolicyInfo,
    ProcessBackend,
    ThreadBackend,
    WorkerError,
    read_frame,
    write_frame,
)
from qvla_ros.policy.types import Observation, PredictedChunk

JOINTS = [f"{a}_{j}" for a in ("left", "right") for j in (*[f"joint{i}" for i in range(1, 7)], "gripper")]
CAMS = ["top", "left_wrist", "right_wrist"]


def obs(stamp=1.0, size=(24, 32)):
    rng = np.random.default_rng(int(stamp * 1000))
    return Observation(
        images={c: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in CAMS},
        state=np.linspace(-0.5, 0.5, 14),
        instruction="transfer the cube",
        stamp=stamp,
    )


def test_frames_round_trip_arrays_exactly():
    buf = io.BytesIO()
    arrays = {"a": np.arange(12, dtype=np.float64).reshape(3, 4), "img": np.ones((2, 3, 3), np.uint8)}
    write_frame(buf, {"op": "x", "n": 1}, arrays)
    write_frame(buf, {"op": "y"})
    buf.seek(0)
    h, a = read_frame(buf)
    assert h == {"op": "x", "n": 1} and a["a"].tolist() == arrays["a"].tolist() and a["img"].dtype == np.uint8
    assert read_frame(buf) == ({"op": "y"}, {})
    with pytest.raises(EOFError):
        read_frame(buf)


def test_frames_refuse_object_arrays():
    with pytest.raises(WorkerError, match="dtype"):
        write_frame(io.BytesIO(), {}, {"x": np.array([object()])})


class StubBackend:
    """A stand-in with the backend interface, for the driver-loop logic (the real policy is tested below)."""

    def __init__(self, path, fail=False, **_):
        self.info = PolicyInfo(CAMS, JOINTS, 4, 1 / 30, f"stub:{path}", str(path))
        self.fail = fail
        self.closed = False
        self.alive = True
        self.calls = 0

    def predict(self, o):
        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(0.01)
        return PredictedChunk(np.full((4, 14), o.stamp), 1 / 30, o.stamp, 0.01, self.info.model_id)

    def close(self):
        self.closed = True


def run_worker(factory, n_obs=5, **kw):
    chunks, errors, loaded = [], [], []
    pending = [(obs(1.0 + k), k) for k in range(n_obs)]
    w = InferenceWorker(
        "thread",
        "A",
        get_observation=lambda: pending.pop(0) if pending else None,
        on_chunk=lambda c, tag: chunks.append((c, tag)),
        on_error=lambda m, tag: errors.append(m),
        on_loaded=loaded.append,
        backend_factory=factory,
        **kw,
    )
    return w, chunks, errors, loaded


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_driver_delivers_chunks_with_their_tags():
    w, chunks, errors, loaded = run_worker(StubBackend)
    w.start()
    assert wait_for(lambda: len(chunks) == 5)
    w.stop()
    assert [tag for _, tag in chunks] == [0, 1, 2, 3, 4] and not errors
    assert loaded[0].model_id == "stub:A" and w.predictions == 5


def test_failures_are_reported_not_raised():
    w, chunks, errors, _ = run_worker(lambda path, **kw: StubBackend(path, fail=True), n_obs=2)
    w.start()
    assert wait_for(lambda: len(errors) == 2)
    w.stop()
    assert not chunks and "inference failed: boom" in errors[0] and w.failures == 2


def test_min_interval_spaces_inferences():
    w, chunks, _, _ = run_worker(StubBackend, n_obs=4, min_interval=0.1)
    t = time.monotonic()
    w.start()
    assert wait_for(lambda: len(chunks) == 4)
    w.stop()
    assert time.monotonic() - t >= 0.3


def test_reload_swaps_and_closes_the_old_backend():
    made = {}

    def factory(path, **kw):
        made[path] = StubBackend(path)
        return made[path]

    stop = threading.Event()
    w = InferenceWorker(
        "thread",
        "A",
        get_observation=lambda: None if stop.is_set() else (obs(time.time()), 0),
        on_chunk=lambda c, t: None,
        on_error=lambda m, t: None,
        backend_factory=factory,
        check=lambda info: "cameras differ" if "bad" in info.path else "",
    )
    w.start()
    assert wait_for(lambda: "A" in made and made["A"].calls > 2)
    ok, msg = w.reload("B")
    assert ok and "loaded stub:B" in msg
    assert wait_for(lambda: made["A"].closed) and w.info.model_id == "stub:B"
    assert wait_for(lambda: made["B"].calls > 2)
    ok, msg = w.reload("bad")
    assert not ok and "refused bad: cameras differ" in msg and "stub:B keeps running" in msg
    assert made["bad"].closed and not made["B"].closed
    stop.set()
    w.stop()
    assert made["B"].closed


def test_a_reload_after_a_failed_first_load_clears_the_failure():
    """Defect: the worker kept status/load_error of a failed first load while the reloaded policy ran, so the node
    held the arms for good. A successful reload must leave it exactly as a first successful load would."""

    def factory(path, **kw):
        if path == "missing":
            raise WorkerError(f"policy path {path} does not exist")
        return StubBackend(path)

    chunks, loaded = [], []
    stop = threading.Event()
    w = InferenceWorker(
        "thread",
        "missing",
        get_observation=lambda: None if stop.is_set() else (obs(time.time()), 0),
        on_chunk=lambda c, t: chunks.append(c),
        on_error=lambda m, t: None,
        on_loaded=loaded.append,
        backend_factory=factory,
    )
    w.start()
    try:
        assert wait_for(lambda: w.status == "load failed")
        assert "does not exist" in w.load_error and not chunks
        ok, msg = w.reload("B")
        assert ok, msg
        assert w.status == "running" and w.load_error == "" and w.path == "B"
        assert wait_for(lambda: len(chunks) > 2) and chunks[-1].model_id == "stub:B"
        time.sleep(1.2)  # past the retry backoff: the failed path must not be retried over the reloaded policy
        assert w.status == "running" and w.load_error == "" and w.info.model_id == "stub:B"
        assert [i.model_id for i in loaded] == ["stub:B"]
    finally:
        stop.set()
        w.stop()


def test_a_failed_reload_after_a_good_load_keeps_the_status():
    stop = threading.Event()
    w = InferenceWorker(
        "thread",
        "A",
        get_observation=lambda: None if stop.is_set() else (obs(time.time()), 0),
        on_chunk=lambda c, t: None,
        on_error=lambda m, t: None,
        backend_factory=StubBackend,
        check=lambda info: "cameras differ" if "bad" in info.path else "",
    )
    w.start()
    try:
        assert wait_for(lambda: w.status == "running")
        for _ in range(2):  # failed, then good, then failed again: each answered, the status always true
            ok, _ = w.reload("bad")
            assert not ok and w.status == "running" and w.load_error == "" and w.info.model_id == "stub:A"
            ok, _ = w.reload("A")
            assert ok and w.status == "running"
    finally:
        stop.set()
        w.stop()


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from qvla_ros.policy.tiny import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", seed=3)


def test_process_backend_matches_the_in_process_runtime(tiny_policy):
    thread = ThreadBackend.load(str(tiny_policy), warmup=False)
    proc = ProcessBackend.load(str(tiny_policy), warmup=True, nice=5, torch_threads=1)
    try:
        assert proc.info.camera_names == CAMS and proc.info.joint_names == JOINTS
        assert proc.info.horizon == thread.info.horizon and proc.info.model_id == thread.info.model_id
        assert proc.info.quantization["artifact_id"] == "fp"
        o = obs(2.5)
        a, b = thread.predict(o), proc.predict(o)
        assert b.stamp == 2.5 and b.actions.shape == (thread.info.horizon, 14)
        np.testing.assert_allclose(b.actions, a.actions, rtol=1e-5, atol=1e-6)  # deterministic noise
        assert b.latency > 0 and "model" in b.timing
        proc.proc.kill()
        proc.proc.wait()
        with pytest.raises(WorkerError, match="exited"):
            proc.predict(o)
    finally:
        proc.close()


def test_process_backend_load_errors_are_clear(tmp_path):
    with pytest.raises(WorkerError, match="does not exist"):
        ProcessBackend.load(str(tmp_path / "nope"))


def test_worker_restarts_a_dead_process(tiny_policy):
    chunks, errors = [], []
    w = InferenceWorker(
        "process",
        str(tiny_policy),
        get_observation=lambda: (obs(time.time()), 0),
        on_chunk=lambda c, t: chunks.append(c),
        on_error=lambda m, t: errors.append(m),
        min_interval=0.05,
    )
    w.start()
    try:
        assert wait_for(lambda: len(chunks) > 2, 60)
        pid = w.child_pids[0]
        w._backend.proc.kill()
        assert wait_for(lambda: w.restarts == 1 and len(w.child_pids) == 1 and w.child_pids[0] != pid, 60)
        n = len(chunks)
        assert wait_for(lambda: len(chunks) > n + 2, 60)
        assert any("restarting" in e for e in errors)
    finally:
        w.stop()
