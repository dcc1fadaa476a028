"""The calibration loop on the user's own robot, in simulation, through real DDS and separate processes: demonstrations
of the sim rig's scripted teleoperator recorded through the ROS graph -> the Calibrate action -> an artifact that meets
the budget -> hot-reloaded by the policy node while its 30 Hz stream goes on. Also: feedback arrives in stage order, a
budget that cannot be met is rejected when the goal arrives (naming the reachable range), bad recordings are skipped
with their reason, and a cancelled calibration resumes from disk and finishes.

The job's own logic (qvla_ros.policy.calibration_job) is checked without ROS at the end of the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_helpers import report

PROBE = Path(__file__).resolve().with_name("calibration_probe.py")
STAGES = ("reading", "sampling", "proxy", "exact", "allocating", "packing", "validating", "reloading")
PERIOD_MS = 1000 / 30
# small numbers: the tiny policies calibrate in seconds
FAST = {"calibration.rank_sample": 8, "calibration.exact_fraction": 0.02, "calibration.torch_threads": 1}


def probe(spawn, ros_env, rigs, *args, timeout=300):
    p = spawn([PROBE, *args], ros_env)
    try:
        return p.finish(timeout=timeout)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        logs = "\n".join(r.log() for r in rigs)
        raise AssertionError(f"probe failed: {e}\n--- node output ---\n{logs}") from None


def synthetic_dataset(root: Path, n: int = 3) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "episodes"))
    from episode_fixtures import write_synthetic

    for i in range(n):
        write_synthetic(root / f"episode_{i:06d}", ticks=40, seed=i)
    broken = root / "episode_000099"
    broken.mkdir()
    (broken / "episode_000099.mcap").write_bytes(b"")  # an empty file under an episode's name
    return root


def check_feedback(feedback: list[dict]) -> None:
    assert feedback, "no feedback"
    order = [STAGES.index(f["stage"]) for f in feedback]
    assert order == sorted(order), [f["stage"] for f in feedback]  # stages never go back
    progress = [f["progress"] for f in feedback]
    assert all(b >= a - 1e-6 for a, b in zip(progress, progress[1:])), progress
    assert all(0.0 <= p <= 1.0 for p in progress)


@pytest.mark.ros
@pytest.mark.slow
def test_record_calibrate_reload_end_to_end(rig, ros_env, spawn, tmp_path, tiny_policies, request):
    ds = tmp_path / "ds"
    # 1. two demonstrations of the scripted teleoperator, recorded through the ROS graph (the record launch)
    t0 = time.monotonic()
    rec = rig(
        launch="record",
        sim="true",
        sim_backend="kinematic",
        dataset=str(ds),
        episodes="2",
        episode_time="2.5",
        reset_time="0.5",
        overrides={"recorder": {"recorder.min_free_gb": 0.05}},
    )
    proc = rec.runner.procs["recorder"]
    try:
        proc.wait(timeout=90)  # the recorder exits after its 2 episodes
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the recorder did not finish its 2 episodes:\n{rec.log()}") from None
    assert proc.returncode == 0, rec.log()
    rec.stop()
    record_s = time.monotonic() - t0
    assert [p.name for p in sorted(ds.glob("episode_*"))] == ["episode_000000", "episode_000001"], rec.log()

    # 2. the policy node drives the rig with the float policy; the calibration node beside it
    policy = tiny_policies[0]
    run = rig(sim="true", sim_backend="kinematic", policy=str(policy))
    cal = rig(launch="calibrate", policy=str(policy), overrides={"calibration": FAST})
    out = probe(
        spawn,
        ros_env,
        [run, cal],
        "--recordings",
        str(ds),
        "--budget",
        "4",
        "--out",
        str(tmp_path / "tiny_a_w4"),
        "--reload",
        "--watch",
        "--samples-per-episode",
        "2",
        "--validation-samples-per-episode",
        "4",
    )
    assert out["accepted"] and out["status"] == "succeeded", (out, cal.log())
    r = out["result"]
    # the artifact meets the budget (the plan's average; the per-row scale/zero come on top)
    assert 3.5 < r["average_bits"] <= 4.0 and r["average_bits_with_overhead"] > r["average_bits"], r
    assert r["skipped"] == [] and "held-out" in r["validation"] and r["action_mse"] >= 0, r
    plots = {p.name for p in (Path(r["report_path"]) / "plots").iterdir()}
    assert {"bits_per_role.png", "sensitivity_spread.png", "bit_histogram.png", "cumulative_error.png"} <= plots
    # the policy node loaded it, and its stream did not stop while the job ran and the policy was swapped
    assert r["reloaded"], (r["reload_message"], run.log())
    assert out["models_before"] == ["tiny_a"], out
    assert len(out["models_after"]) == 1 and out["models_after"][0].startswith("tiny_a_w4@"), out
    check_feedback(out["feedback"])
    assert [f["stage"] for f in out["feedback"]][-1] == "reloading"
    assert any(f["eta_s"] >= 0 for f in out["feedback"])
    # through the swap: no tick missed in the stream the node publishes (its header stamps), and a sanity bound at
    # a subscriber in another process (DDS delivery and scheduling on a shared 2-core machine come on top)
    swap, job = out["commands_during_reload"], out["commands_during_job"]
    assert swap["count"] >= 30 and swap["node_gap_max_ms"] <= 2 * PERIOD_MS, swap
    assert swap["max_gap_ms"] <= 5 * PERIOD_MS, swap
    # while the (niced) job computes beside it, the loop keeps streaming; other work on the machine can stretch
    # a period now and then, reported here
    assert job["rate_hz"] >= 28 and job["node_gap_max_ms"] <= 10 * PERIOD_MS, job
    stage_t = {}
    for f in out["feedback"]:
        stage_t.setdefault(f["stage"], f["t"])
    report(
        request,
        "calibration_loop",
        {
            "record_s": record_s,
            "calibrate_and_reload_s": out["seconds"],
            "average_bits": r["average_bits"],
            "action_mse": r["action_mse"],
            "swap_node_gap_max_ms": swap["node_gap_max_ms"],
            "swap_max_gap_ms": swap["max_gap_ms"],
            "job_node_gap_max_ms": job["node_gap_max_ms"],
            **{f"t_{k}": v for k, v in stage_t.items()},
        },
    )


@pytest.mark.ros
def test_unreachable_budget_is_rejected_and_a_cancelled_calibration_resumes(
    rig, ros_env, spawn, tmp_path, tiny_policies
):
    ds = synthetic_dataset(tmp_path / "ds")
    cal = rig(launch="calibrate", policy=str(tiny_policies[0]), overrides={"calibration": FAST})
    out_dir = tmp_path / "art"
    common = [
        "--recordings",
        str(ds),
        str(tmp_path / "missing"),
        "--out",
        str(out_dir),
        "--samples-per-episode",
        "2",
        "--validation-samples-per-episode",
        "3",
    ]

    rejected = probe(spawn, ros_env, [cal], *common, "--budget", "0.2", "--bits", "2,4,8,16")
    assert not rejected["accepted"], rejected
    assert "reachable range is 2.000 .. 16.000" in rejected["rejection"], rejected
    assert not out_dir.exists()

    first = probe(spawn, ros_env, [cal], *common, "--budget", "4", "--cancel-at", "exact")
    assert first["accepted"] and first["status"] == "canceled", (first, cal.log())
    assert "resumable" in first["result"]["summary"], first
    check_feedback(first["feedback"])
    index = json.loads((out_dir / "sensitivity" / "index.json").read_text())
    assert all(m["proxy_done"] for m in index["layers"].values())  # what was done is on disk
    assert not (out_dir / "artifact.json").exists()

    second = probe(spawn, ros_env, [cal], *common, "--budget", "4")
    assert second["status"] == "succeeded", (second, cal.log())
    r = second["result"]
    assert "resumed an interrupted run" in r["summary"] and r["average_bits"] <= 4.0, r
    skipped = "\n".join(r["skipped"])
    assert "episode_000099" in skipped and "empty" in skipped and "missing: does not exist" in skipped, skipped
    check_feedback(second["feedback"])
    assert (out_dir / "artifact.json").is_file()


# ---------------------------------------------------------------------------- the job without ROS
def test_job_refuses_what_it_cannot_use_with_the_reason(tmp_path, tiny_policies):
    from qvla_ros.policy.calibration_job import JobError, JobSpec, budget_range, run_job

    policy = tiny_policies[0]
    lo, hi = budget_range(policy, (0, 2, 4, 8, 16))
    assert 0 < lo < 2 and hi == 16.0
    assert budget_range(policy, (4, 8, 16))[0] == pytest.approx(4.0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.mcap").write_bytes(b"not an mcap file")
    spec = JobSpec(policy=str(policy), recordings=[str(bad), str(tmp_path / "nope")], out=str(tmp_path / "o"), budget=4)
    with pytest.raises(JobError, match="no usable recording left: ") as e:
        run_job(spec)
    assert "bad.mcap: not an MCAP file" in str(e.value) and "nope: does not exist" in str(e.value)
    for field, value, match in (
        ("budget", 0.0, "budget must be a positive"),
        ("bits", (5, 16), r"\[5\] not in"),
        ("solver", "exact", "solver 'exact'"),
        ("policy", str(tmp_path / "nope"), "does not exist"),
    ):
        s = JobSpec(**{**spec.to_dict(), field: value})
        with pytest.raises(JobError, match=match):
            s.check()
    with pytest.raises(JobError, match="reachable range is 4.000 .. 16.000"):
        run_job(JobSpec(**{**spec.to_dict(), "recordings": [str(bad)], "budget": 3.0, "bits": (4, 8, 16)}))


# ---------------------------------------------------------------------------- the launch files (no ROS needed)
@pytest.mark.parametrize(
    "launch,args,names",
    [
        (
            "record",
            {"sim": "true", "dataset": "/tmp/ds", "episodes": "3", "episode_time": "9"},
            ["sim_rig", "recorder"],
        ),
        ("record", {"dataset": "/tmp/ds"}, ["recorder"]),
        ("calibrate", {"policy": "/tmp/p", "sim": "true"}, ["calibration"]),
    ],
)
def test_record_and_calibrate_launch_files_start_the_bringup_node_set(monkeypatch, launch, args, names):
    from test_launch import fake_launch_modules, load_launch_file

    from qvla_ros.bringup import node_set

    context = fake_launch_modules(monkeypatch, args)
    desc = load_launch_file(Path(__file__).resolve().parents[2] / "launch" / f"{launch}.launch.py")
    actions = desc.generate_launch_description().args[0][-1].kwargs["function"](context)
    nodes = [a.kwargs for a in actions if "executable" in a.kwargs]
    specs, _ = node_set(context, launch=launch)
    assert [n["name"] for n in nodes] == [s.name for s in specs] == names
    for n, s in zip(nodes, specs):
        assert n["parameters"] == [*s.params_files, s.parameters]
    by = {s.name: s for s in specs}
    if "sim_rig" in by:  # recording in simulation: the scripted teleoperator drives the rig, episodes reset it
        assert by["sim_rig"].parameters["sim.teleop"] is True
        assert by["recorder"].parameters["recorder.rig_service"] == "/qvla/sim/episode"
        assert by["recorder"].parameters["recorder.num_episodes"] == 3
    if launch == "record" and "sim_rig" not in by:
        assert "recorder.auto_start" not in by["recorder"].parameters  # the robot: EpisodeControl and the keys
    if launch == "calibrate":
        assert by["calibration"].parameters["calibration.policy"] == "/tmp/p"


def test_record_launch_arguments_are_checked():
    from qvla_ros.bringup import BringupError, node_set

    with pytest.raises(BringupError, match="dataset:=DIR is required"):
        node_set({}, launch="record")
    with pytest.raises(BringupError, match="needs episode_time"):
        node_set({"dataset": "/tmp/d", "episodes": "2"}, launch="record")
    with pytest.raises(BringupError, match="episodes:=two must be a whole number"):
        node_set({"dataset": "/tmp/d", "episodes": "two"}, launch="record")
