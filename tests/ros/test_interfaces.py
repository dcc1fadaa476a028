"""qvla_msgs across real processes: topics, a service and an action over DDS (shared memory, own domain)."""

from __future__ import annotations

from pathlib import Path

import pytest

PEERS = Path(__file__).with_name("ros_peers.py")
pytestmark = pytest.mark.ros


def test_action_chunks_between_processes(ros_env, spawn):
    sub = spawn([PEERS, "subscribe-chunks", "--count", "20", "--timeout", "30"], ros_env)
    pub = spawn([PEERS, "publish-chunks", "--count", "20", "--timeout", "30"], ros_env)
    assert pub.finish()["matched"], "publisher never matched the subscriber"
    got = sub.finish()["received"]
    # reliable QoS, depth 10, 50 Hz: every chunk arrives, in order, field for field
    assert [m["seq"] for m in got] == list(range(20))
    m = got[7]
    assert m["model_id"] == "test-model" and m["horizon"] == 4 and m["period_ns"] == 33_333_333
    assert m["joints"][0] == "left_joint1" and m["joints"][6] == "right_joint1" and len(m["joints"]) == 12
    assert m["positions"] == pytest.approx([7 + 0.001 * k for k in range(4 * 12)], abs=1e-12)
    assert m["latency"] == pytest.approx(0.07, abs=1e-12)


def test_reload_service_and_calibrate_action_between_processes(ros_env, spawn):
    server = spawn([PEERS, "serve", "--timeout", "60"], ros_env)
    assert server.read_json()["ready"]

    ok = spawn([PEERS, "call-reload", "--path", "/models/new.ok"], ros_env).finish()
    assert ok == {"success": True, "message": "reloaded /models/new.ok"}
    refused = spawn([PEERS, "call-reload", "--path", "/models/bad"], ros_env).finish()
    assert refused == {"success": False, "message": "refused"}

    res = spawn([PEERS, "call-calibrate", "--budget", "3.5"], ros_env).finish()
    assert res["artifact_path"] == "/tmp/out"
    assert res["average_bits"] == pytest.approx(3.5)
    assert res["summary"] == "bits [0, 2, 4, 8, 16]"
    stages = [f["stage"] for f in res["feedback"]]
    # feedback is best-effort (the first may go out before the client's feedback subscription matched)
    assert stages and set(stages) <= {"loading", "proxy", "exact", "allocate", "pack"} and stages[-1] == "pack"
    assert res["feedback"][-1]["progress"] == pytest.approx(1.0)
