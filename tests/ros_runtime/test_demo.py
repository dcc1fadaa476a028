"""`make demo` (python -m qvla_ros.demo): the missing-policy message, and a short run with a random policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.ros
def test_missing_policy_says_what_to_do(ros_env, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qvla_ros.demo", "--policy", str(tmp_path / "none"), "--run-dir", str(tmp_path)],
        env=ros_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "not found" in out.stderr and "--random-policy" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.ros
@pytest.mark.slow
def test_demo_runs_episodes_and_writes_a_report(ros_env, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "qvla_ros.demo",
        "--random-policy",
        "--episodes",
        "2",
        "--episode-seconds",
        "3",
        "--sim-backend",
        "kinematic",
        "--run-dir",
        str(tmp_path),
        "--domain-id",
        ros_env["ROS_DOMAIN_ID"],
    ]
    out = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "RANDOM-WEIGHT" in out.stdout and "MEANINGLESS" in out.stdout  # loud, in the output and the report
    assert "episode 2/2" in out.stdout and "cmd" in out.stdout and "infer p50" in out.stdout  # the live line
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["random_policy"] and len(report["episodes"]) == 2 and report["success_rate"] == 0.0
    assert [e["seed"] for e in report["episodes"]] == [1000, 1001]  # held-out scenes (config/bimanual.yaml)
    assert abs(report["timing"]["command_rate_hz"] - 30.0) < 2.0 and report["timing"]["latency_p50_ms"] > 0
    assert "success rate: 0/2" in (tmp_path / "report.txt").read_text()
