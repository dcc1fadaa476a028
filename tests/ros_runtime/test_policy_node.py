"""The policy node end to end: separate processes over real DDS (shared memory, own domain), started through the
bring-up runner, driven by real tiny π0 policies through PolicyRuntime, watched by tests/ros_runtime/probe.py.

The kinematic sim backend (no physics, synthetic images) keeps the CPU for the node under test; the MuJoCo rig is
exercised in test_sim.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runtime_helpers import PROBE, report

pytestmark = pytest.mark.ros
PERIOD_MS = 1000 / 30


def kinematic(rig, policy, **kw):
    return rig(sim="true", sim_backend="kinematic", policy=str(policy), **kw)


def probe(spawn, ros_env, r, *args, timeout=150):
    p = spawn([PROBE, *args], ros_env)
    try:
        return p.finish(timeout=timeout)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"probe failed: {e}\n--- node output ---\n{r.log()}") from None


@pytest.mark.slow
def test_commands_at_30_hz_for_10_s_finite_and_within_limits(rig, ros_env, spawn, tiny_policies, request):
    r = kinematic(rig, tiny_policies[0])
    out = probe(spawn, ros_env, r, "stream", "--seconds", "10")
    report(
        request,
        "stream",
        {
            k: out[k]
            for k in (
                "rate_hz",
                "period_p50_ms",
                "period_p99_ms",
                "period_max_ms",
                "period_error_p99_ms",
                "count",
                "chunks",
                "held_diagnostics",
                "node_gap_p99_ms",
                "node_gap_max_ms",
            )
        }
        | {
            "camera_to_command_p50_ms": float(out["inference"].get("camera_to_command_p50_ms", "nan")),
            "inference_p50_ms": float(out["inference"].get("latency_p50_ms", "nan")),
            "node_period_p99_ms": float(out["node"].get("period_p99_ms", "nan")),
        },
    )
    assert abs(out["rate_hz"] - 30.0) <= 1.0, out
    assert out["count"] >= 290, out  # 10 s at 30 Hz, measured at a subscriber in another process
    assert out["non_finite"] == 0 and out["outside_limits"] == 0 and not out["malformed"], out
    # the policy really drives: commands change and chunks keep arriving (a machine-wide stall of more than
    # cameras.max_age makes the node hold for a moment, by design: tolerated, and reported above)
    assert out["distinct_commands"] > 200 and out["chunks"] >= 10, out
    assert out["inference"]["model_id"] == "tiny_a" and out["inference"]["failures"] == "0", out


def test_faults_hold_the_last_safe_command_and_recover(rig, ros_env, spawn, tiny_policies, request):
    """A stopped camera (reported within 200 ms, resumes when it restarts), an e-stop, a dead inference worker."""
    r = kinematic(rig, tiny_policies[0])
    out = probe(spawn, ros_env, r, "faults", "--camera", "left_wrist")
    report(request, "faults", {k: v for k, v in out.items() if isinstance(v, (int, float))})
    # the report (diagnostics naming the camera) arrives within 200 ms of the camera's last frame
    assert out["camera_hold_after_last_frame_ms"] is not None, out
    assert out["camera_hold_after_last_frame_ms"] <= 200.0, out
    assert "left_wrist" in out["camera_hold_message"], out
    # while held: the same (last safe) command, still at 30 Hz
    assert out["commands_while_held"] >= 5 and out["distinct_commands_while_held"] == 1, out
    assert out["camera_resume_after_restart_ms"] is not None and out["distinct_commands_after_resume"] > 5, out
    # e-stop: hold at once, resume on release
    assert out["estop_hold_ms"] is not None and out["estop_hold_ms"] <= 200.0, out
    assert out["distinct_commands_while_estop"] == 1 and out["estop_resume_ms"] is not None, out
    # a failed inference (the worker process killed): hold at once with the reason, restart, resume
    assert out["worker_killed_hold_ms"] is not None and out["worker_killed_hold_ms"] <= 500.0, out
    assert "inference" in out["worker_killed_message"] or "policy" in out["worker_killed_message"], out
    assert out["worker_restart_resume_s"] is not None and out["worker_restarts"] == 1 and out["worker_pid_changed"]
    assert out["non_finite"] == 0 and out["outside_limits"] == 0, out
    assert abs(out["stream_rate_hz"] - 30.0) <= 1.5, out  # holding never stops the stream


def test_reload_under_load_leaves_no_gap(rig, ros_env, spawn, tiny_policies, request):
    # inference back to back: the old worker keeps a core busy while the new one loads beside it
    r = kinematic(rig, tiny_policies[0], overrides={"policy_node": {"policy.min_interval": 0.0}})
    out = probe(spawn, ros_env, r, "reload", "--path", str(tiny_policies[1]))
    report(
        request,
        "reload",
        {
            k: out[k]
            for k in ("reload_seconds", "node_gap_max_ms", "node_gap_p99_ms", "max_gap_ms", "period_p99_ms", "count")
        },
    )
    assert out["success"], out
    assert "tiny_b" in out["message"], out
    assert out["models_before"] == ["tiny_a"] and out["models_after"] == ["tiny_b"], out
    # no gap longer than two periods in the stream the node publishes (the commands' header stamps: the node's
    # tick times, from the reload call until 1.5 s after it returned) ...
    assert out["node_gap_max_ms"] <= 2 * PERIOD_MS, out
    # ... and at a subscriber in another process, which adds DDS delivery and its own scheduling on a shared
    # 2-core machine (measured 61-114 ms there with other jobs running; reported above): a sanity bound only
    assert out["max_gap_ms"] <= 5 * PERIOD_MS, out
    assert out["count"] >= 30 * out["reload_seconds"], out
    assert not out["refused"]["success"] and "does not exist" in out["refused"]["message"], out
    assert out["non_finite"] == 0 and out["outside_limits"] == 0, out


@pytest.mark.parametrize("adapter", ["forward_command", "joint_trajectory"])
def test_arm_outputs_are_well_formed_and_drive_the_rig(adapter, rig, ros_env, spawn, tiny_policies):
    # the sim rig subscribes through the same arm output: commands that arrive and parse there move its arms
    r = kinematic(rig, tiny_policies[0], adapter=adapter)
    out = probe(spawn, ros_env, r, "stream", "--seconds", "2", "--adapter", adapter)
    assert not out["malformed"] and out["count"] >= 50, out
    assert out["distinct_commands"] > 20 and out["non_finite"] == 0 and out["outside_limits"] == 0, out
    assert out["node"]["adapter"] == adapter


def test_y1_output_is_refused_with_a_clear_message(ros_env, tiny_policies):
    cmd = [
        sys.executable,
        "-m",
        "qvla_ros.nodes.policy_node",
        "--ros-args",
        "-p",
        "output.adapter:=y1",
        "-p",
        f"policy.path:={tiny_policies[0]}",
    ]
    out = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "y1_msg, which is not importable" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_bad_parameters_are_refused_naming_the_parameter(ros_env, tiny_policies):
    base = [sys.executable, "-m", "qvla_ros.nodes.policy_node", "--ros-args", "-p", f"policy.path:={tiny_policies[0]}"]
    for extra, words in (
        (["-p", "control.blending:=mean"], "control.blending = 'mean' is not one of"),
        (["-p", "control.rate_hz:=0.0"], "control.rate_hz"),
        ([], None),
    ):
        if words is None:  # no policy: the node says which parameter to set
            cmd = [sys.executable, "-m", "qvla_ros.nodes.policy_node"]
            words = "policy.path is empty"
        else:
            cmd = base + extra
        out = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and words in out.stderr, (cmd, out.stderr[-1500:])


def test_bringup_runner_prefixes_output_and_stops_on_ctrl_c(ros_env, tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "qvla_ros.bringup", "--launch", "sim", "sim_backend:=kinematic"]
    p = subprocess.Popen(cmd, env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            if "kinematic rig" in line:
                break
        assert any(line.startswith("[sim_rig]") and "kinematic rig" in line for line in lines), "".join(lines)
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, "".join(lines) + rest
    assert "[bringup] stopped (exit code 0)" in rest, rest


def test_bringup_print_and_argument_errors(ros_env, tiny_policies):
    run = [sys.executable, "-m", "qvla_ros.bringup"]
    out = subprocess.run(
        run + ["--print", "sim:=true", f"policy:={tiny_policies[0]}", "adapter:=joint_trajectory"],
        env=ros_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "/qvla/sim_rig:" in out.stdout and "/qvla/policy_node:" in out.stdout
    assert 'output.adapter:="joint_trajectory"' in out.stdout and 'safety.arm_profile:="sim"' in out.stdout
    bad = subprocess.run(run + ["adapter:=can"], env=ros_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "adapter:=can is not one of" in bad.stderr and "Traceback" not in bad.stderr
    nopolicy = subprocess.run(run, env=ros_env, capture_output=True, text=True, timeout=60)
    assert nopolicy.returncode == 2 and "policy:=DIR is required" in nopolicy.stderr
    assert json  # keep the import for readers running this file standalone
