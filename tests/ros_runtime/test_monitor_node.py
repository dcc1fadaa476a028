"""The monitor node end to end over real DDS (sim rig + policy node + monitor as processes, started by the bring-up
runner, watched by monitor_probe.py), its start-up errors, the bring-up arguments that start it, and the shipped rviz /
rqt configuration (which must reference only topics and types the graph publishes).

The kinematic sim backend keeps the CPU for the nodes; the real policies are tiny random-weight π0s (conftest), and
the quantized one is their per-channel RTN W4 artifact.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qvla_ros.bringup import command_line, node_set
from qvla_ros.control.params import MONITOR_NODE

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().with_name("monitor_probe.py")
MARKER_KEYS = {(f"{s}/{a}", i) for s in ("quantized", "reference") for a in ("left", "right") for i in (0, 1)}


@pytest.fixture(scope="session")
def tiny_rtn_w4(tiny_policies, tmp_path_factory):
    """Per-channel RTN W4 artifact of tiny_a (what `qvla-quant` / bench_policy make for the RTN rows)."""
    from qvla_quant.baselines import uniform_plan
    from qvla_ros.policy.quantize import policy_adapter, write_quantized_policy

    src = tiny_policies[0]
    _, adapter = policy_adapter(src)
    plan = uniform_plan(adapter.layers(), 4)
    return write_quantized_policy(src, plan, tmp_path_factory.mktemp("rtn") / "tiny_a_w4")


def run_probe(spawn, ros_env, r, *args, timeout=150):
    p = spawn([PROBE, *args], ros_env)
    try:
        return p.finish(timeout=timeout)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"probe failed: {e}\n--- node output ---\n{r.log(8000)}") from None


def start(rig, policy, reference, **overrides):
    return rig(
        sim="true",
        sim_backend="kinematic",
        policy=str(policy),
        monitor="true",
        reference=str(reference),
        overrides={"monitor": overrides} if overrides else None,
    )


def check_markers(updates):
    assert updates, "no MarkerArray received"
    for u in updates:
        assert {(m["ns"], m["id"]) for m in u} == MARKER_KEYS  # the same namespaces and ids every update
        for m in u:
            assert m["frame"] == "world" and m["action"] == 0 and m["n"] == 30 and m["finite"], m
            assert m["type"] == (4 if m["id"] == 0 else 7) and m["scale"][0] > 0 and m["colour"][3] == 1.0
    colours = {m["ns"].split("/")[0]: tuple(m["colour"]) for m in updates[-1]}
    assert colours["quantized"] != colours["reference"]


# ---------------------------------------------------------------- over DDS
@pytest.mark.ros
@pytest.mark.slow
def test_quantized_then_fallback_to_the_float_policy_over_dds(rig, ros_env, spawn, tiny_policies, tiny_rtn_w4):
    """One rig, the whole story: the RTN W4 artifact deviates (positive, running sums per arm and in total), an
    EpisodeControl START on the policy node resets the sums, the error level (chunk deviation above 1e-6) holds for
    `hold` seconds and the monitor has the policy node reload the float policy; from then on both sides run the same
    float policy on the same observations and the deviation is exactly 0."""
    hold = 3.0
    fp = tiny_policies[0]
    r = start(
        rig,
        tiny_rtn_w4,
        fp,
        **{"monitor.thresholds.chunk": [1e-7, 1e-6], "monitor.fallback.path": str(fp), "monitor.fallback.hold": hold},
    )
    out = run_probe(
        spawn, ros_env, r, "--deviations", "3", "--episode-start", "--fallback-model", "tiny_a", "--after-fallback", "3"
    )
    assert out["got_deviations"] and out["episode_response"][0] and out["got_new_episode"], r.log()
    devs = out["deviations"]
    quant = [d for d in devs if d["model_id"].startswith("tiny_a_w4@")]
    assert len(quant) >= 5
    assert all(d["chunk_l2_total"] > 0 and d["first_action_l2_total"] > 0 for d in quant)
    assert all(d["reference_id"] == "tiny_a" and d["arm_names"] == ["left", "right"] for d in devs)
    # Eq. 5: within an episode the cumulative value is the running sum of the per-chunk values
    pairs = 0
    for prev, d in zip(quant, quant[1:]):
        if d["episode"] == prev["episode"] and d["episode_step"] == prev["episode_step"] + 1:
            pairs += 1
            assert d["cumulative_l2_total"] == pytest.approx(prev["cumulative_l2_total"] + d["chunk_l2_total"])
            for a in range(2):
                assert d["cumulative_l2"][a] == pytest.approx(prev["cumulative_l2"][a] + d["chunk_l2"][a])
    assert pairs >= 3
    # START on the policy node: a new episode number, and the sums start again
    new = int(out["episode_response"][1])
    first_new = next(d for d in devs if d["episode"] == new)
    assert first_new["episode_step"] == 1
    assert first_new["cumulative_l2_total"] == pytest.approx(first_new["chunk_l2_total"])
    assert max(d["cumulative_l2_total"] for d in devs if d["episode"] < new) > 0
    # the fallback: requested after the error held for `hold` s (not before), said so in the diagnostics, loaded
    assert out["fallback_done"], f"{out['diag'][-1:]}\n{r.log()}"
    t_error = next(d["t"] for d in devs if d["chunk_l2_total"] >= 1e-6)
    fired = [(t, e["fallback"]) for t, e in out["diag"] if e.get("fallback", [0, "", {}])[2].get("fired") == "True"]
    t_fired, status = fired[0]
    assert status[0] == 1 and str(fp) in status[1] and "fallback requested" in status[1], status
    assert "loaded" in fired[-1][1][1], fired[-1]
    assert t_fired - t_error >= hold - 0.3, (t_fired, t_error)  # (a DDS delay tolerated)
    # the same float policy on both sides now: bit-identical actions on the same observation
    after = [d for d in devs if d["model_id"] == "tiny_a"]
    assert len(after) >= 3
    for d in after:
        assert d["chunk_l2_total"] == 0.0 and d["first_action_l2_total"] == 0.0 and d["max_joint_deviation"] == 0.0
        assert d["chunk_l2"] == [0.0, 0.0] and d["reference_latency"] > 0
    assert [d["compared"] for d in devs] == sorted(d["compared"] for d in devs)
    # commanded vs measured: known and finite once both streams run
    assert all(isinstance(x, float) and math.isfinite(x) for x in devs[-1]["tracking_l2"]), devs[-1]
    check_markers(out["markers"])
    assert out["marker_updates"] >= 5
    # the chunks carry what the observation was built from
    c = out["chunks"][-1]
    assert c["cameras"] == ["top", "left_wrist", "right_wrist"] and c["stamps"] == 3 and c["state"] == 14
    assert c["instruction"] == "transfer the cube" and c["episode"] == new
    diag = out["diag"][-1][1]
    assert diag["reference"][0] == 0 and "compared" in diag["reference"][1], diag["reference"]
    assert diag["chunk"][0] == 0 and diag["fallback"][2]["state"] == "fired", diag


@pytest.mark.ros
def test_a_missing_or_quantized_reference_is_refused_naming_the_parameter(ros_env, tiny_rtn_w4, tmp_path):
    base = [sys.executable, "-m", "qvla_ros.nodes.monitor_node", "--ros-args"]
    for extra, words in (
        (["-p", f"monitor.reference_path:={tmp_path / 'none'}"], "does not exist"),
        (["-p", f"monitor.reference_path:={tiny_rtn_w4}"], "is a quantized qvla_quant artifact"),
        (["-p", f"monitor.reference_path:={tmp_path}"], "is not a policy directory"),
        ([], "monitor.reference_path is empty"),
    ):
        out = subprocess.run(base + extra, env=ros_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "monitor.reference_path" in out.stderr and words in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- bring-up (no DDS)
def _monitor_spec(specs):
    return next(s for s in specs if s.name == "monitor")


def test_monitor_argument_starts_the_node_with_its_reference(tmp_path):
    ref = tmp_path / "fp"
    ref.mkdir()
    specs, notes = node_set(
        {
            "sim": "true",
            "policy": "/tmp/p",
            "monitor": "true",
            "reference": str(ref),
            "device": "cuda",
            "reference_device": "cuda:1",
        }
    )
    mon = _monitor_spec(specs)
    assert [s.name for s in specs] == ["sim_rig", "policy_node", "monitor"]
    assert mon.module == "qvla_ros.nodes.monitor_node" and mon.executable == "qvla-monitor-node"
    assert mon.parameters["monitor.reference_path"] == str(ref.resolve())
    assert mon.parameters["monitor.device"] == "cuda:1" and mon.fqn == "/qvla/monitor"
    # without reference:=, an artifact's recorded source policy is the reference
    art = tmp_path / "w4"
    art.mkdir()
    (art / "artifact.json").write_text(json.dumps({"extra": {"policy_source": str(ref)}}))
    specs, notes = node_set({"policy": str(art), "monitor": "true"})
    assert _monitor_spec(specs).parameters["monitor.reference_path"] == str(ref.resolve())
    assert _monitor_spec(specs).parameters["monitor.device"] == "cpu"
    assert any("the policy the artifact was made from" in n for n in notes)
    # nothing known: the node starts and refuses, naming monitor.reference_path (tested above)
    specs, _ = node_set({"policy": "/tmp/p", "monitor": "true"})
    assert "monitor.reference_path" not in _monitor_spec(specs).parameters


def test_rviz_and_rqt_start_with_the_shipped_files_where_installed(monkeypatch):
    import qvla_ros.bringup as bringup

    monkeypatch.setattr(bringup.shutil, "which", lambda name: None)
    specs, notes = node_set({"policy": "/tmp/p", "rviz": "true", "rqt": "true"})
    assert [s.name for s in specs] == ["policy_node"]
    assert any(n.startswith("rviz:=true ignored: rviz2 is not installed") for n in notes)
    assert any(n.startswith("rqt:=true ignored: rqt is not installed") for n in notes)
    monkeypatch.setattr(bringup.shutil, "which", lambda name: f"/opt/ros/bin/{name}")
    specs, notes = node_set({"policy": "/tmp/p", "rviz": "true", "rqt": "true"})
    rviz, rqt = specs[1], specs[2]
    assert (rviz.package, rviz.executable, rviz.arguments[0]) == ("rviz2", "rviz2", "-d")
    assert rviz.arguments[1].endswith("config/qvla.rviz") and Path(rviz.arguments[1]).is_file()
    assert (rqt.package, rqt.executable) == ("rqt_gui", "rqt_gui") and rqt.arguments[0] == "--perspective-file"
    assert Path(rqt.arguments[1]).name == "qvla.perspective" and not notes
    cmd = command_line(rqt)
    assert cmd[:3] == ["/opt/ros/bin/rqt", "--perspective-file", rqt.arguments[1]] and cmd[3] == "--ros-args"


# ---------------------------------------------------------------- shipped rviz / rqt files (no DDS)
def graph_topics() -> dict[str, str]:
    """Topic -> type of what the node set (sim:=true monitor:=true) publishes that the files may show."""
    from qvla_ros.episodes.topics import load_topic_config

    topics = load_topic_config(REPO / "config" / "topics.yaml")
    mon = _monitor_spec(node_set({"sim": "true", "policy": "/tmp/p", "monitor": "true"})[0]).fqn
    out = {c.topic: c.type for c in topics.cameras}
    out[f"{mon}/markers"] = "visualization_msgs/msg/MarkerArray"
    out[f"{mon}/deviation"] = "qvla_msgs/msg/ActionDeviation"
    return out


def test_the_rviz_config_shows_the_cameras_and_markers_in_the_markers_frame():
    cfg = yaml.safe_load((REPO / "config" / "qvla.rviz").read_text())
    vm = cfg["Visualization Manager"]
    graph = graph_topics()
    rviz_type = {
        "rviz_default_plugins/Image": "sensor_msgs/msg/Image",
        "rviz_default_plugins/MarkerArray": "visualization_msgs/msg/MarkerArray",
    }
    shown = {}
    for d in vm["Displays"]:
        if "Topic" not in d:
            continue
        topic = d["Topic"]["Value"]
        assert topic in graph, f"{d['Name']}: {topic} is not published by the graph"
        assert rviz_type[d["Class"]] == graph[topic], d
        shown[topic] = d
    cameras = [t for t, ty in graph.items() if ty == "sensor_msgs/msg/Image"]
    assert sorted(t for t in shown if t in cameras) == sorted(cameras)  # all three cameras
    for t in cameras:  # the cameras publish best effort: a reliable subscriber would see nothing
        assert shown[t]["Topic"]["Reliability Policy"] == "Best Effort"
    assert "/qvla/monitor/markers" in shown
    assert vm["Global Options"]["Fixed Frame"] == MONITOR_NODE.defaults()["monitor.markers.frame"]


def test_the_rqt_perspective_plots_existing_deviation_fields():
    pytest.importorskip("qvla_msgs")
    from qvla_msgs.msg import ActionDeviation

    persp = json.loads((REPO / "config" / "qvla.perspective").read_text())
    plugins = persp["groups"]["pluginmanager"]["groups"]
    running = ast.literal_eval(persp["groups"]["pluginmanager"]["keys"]["running-plugins"]["repr"])
    assert set(running) == {"rqt_plot/Plot"} and len(running["rqt_plot/Plot"]) >= 2
    fields = ActionDeviation.get_fields_and_field_types()
    graph = graph_topics()
    plotted = []
    for key, group in plugins.items():
        if not key.startswith("plugin__rqt_plot__Plot__"):
            continue
        topics = ast.literal_eval(group["groups"]["plugin"]["keys"]["topics"]["repr"])
        topics = [topics] if isinstance(topics, str) else topics  # rqt_plot stores one topic as a plain string
        assert topics, key
        for t in topics:
            topic, _, field = t.rpartition("/")
            assert graph.get(topic) == "qvla_msgs/msg/ActionDeviation", t
            name, _, index = field.partition("[")
            assert name in fields, f"{t}: ActionDeviation has no field {name}"
            ftype = fields[name]
            if index:
                assert ftype.startswith("sequence<double") and int(index.rstrip("]")) < 2, t  # per arm
            else:
                assert ftype in ("double", "uint32"), t
            plotted.append(field)
    assert {"chunk_l2_total", "cumulative_l2_total", "first_action_l2_total"} <= set(plotted)
    assert {"tracking_l2[0]", "tracking_l2[1]", "cumulative_l2[0]", "cumulative_l2[1]"} <= set(plotted)


# ---------------------------------------------------------------- the demo's report (no DDS; the run: make demo)
def test_demo_report_gives_each_episodes_cumulative_deviation(tmp_path):
    from qvla_ros.demo import write_report

    mon = {
        "cumulative_deviation": 2.81,
        "cumulative_first_action_deviation": 0.43,
        "chunks_compared": 21,
        "mean_chunk_deviation": 0.134,
        "max_chunk_deviation": 0.334,
        "max_joint_deviation": 0.09,
        "skipped_total": 0,
        "unmatched_total": 1,
        "reference_id": "fp",
    }
    episode = {
        "episode": 1,
        "seed": 1000,
        "succeeded": False,
        "max_reward": 1,
        "sim_time": 15.0,
        "time_to_success": None,
        "monitor": mon,
    }
    timing = {
        "command_rate_hz": 30.0,
        "command_period_p50_ms": 33.3,
        "command_period_p99_ms": 41.7,
        "command_period_max_ms": 55.2,
        "latency_p50_ms": 532.0,
        "latency_p99_ms": 1058.0,
        "camera_to_command_p50_ms": 542.0,
        "camera_to_command_p99_ms": 899.0,
        "held_ticks": 9,
        "ticks": 900,
    }
    report = {
        "policy": "w4",
        "model_id": "w4@x",
        "random_policy": False,
        "quantization": {},
        "success_rate": 0.0,
        "episodes": [episode, {**episode, "episode": 2, "monitor": None}],
        "timing": timing,
        "wall_seconds": 41.0,
        "machine": {"cpus": 2, "load_average": [1.0, 1.0, 1.0]},
        "monitor": {
            "reference": "models/fp",
            "episodes_with_deviation": 1,
            "mean_cumulative_deviation": 2.81,
            "chunks_compared": 21,
            "skipped_total": 0,
            "unmatched_total": 1,
            "reference_latency_p50_ms": 267.0,
        },
    }
    js, txt = write_report(report, tmp_path)
    text = txt.read_text()
    assert "cumulative deviation 2.810 over 21 chunks" in text and "cumulative deviation n/a" in text
    assert "cumulative (Eq. 5) 2.810 per episode" in text and "models/fp" in text
    assert json.loads(js.read_text())["episodes"][0]["monitor"]["cumulative_deviation"] == 2.81
