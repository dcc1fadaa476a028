"""The node set has one source (qvla_ros.bringup): the launch files and the launch-free runner both read it.

`launch` / `launch_ros` have no wheels, so the launch files are executed here against small stand-ins that record
what they are given; where launch_ros is importable (a ROS 2 install), the real launch description is checked too.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from qvla_ros.bringup import LAUNCH_ARGUMENTS, BringupError, command_line, node_set, parse_args

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILES = {"bimanual": REPO / "launch" / "bimanual.launch.py", "sim": REPO / "launch" / "sim.launch.py"}


class Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def fake_launch_modules(monkeypatch, configuration: dict[str, str]):
    """Stand-ins for launch, launch.actions, launch.substitutions and launch_ros.actions."""

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    mods = {
        "launch": types.SimpleNamespace(LaunchDescription=Recorder),
        "launch.actions": types.SimpleNamespace(
            DeclareLaunchArgument=Recorder, LogInfo=Recorder, OpaqueFunction=Recorder
        ),
        "launch.substitutions": types.SimpleNamespace(LaunchConfiguration=LaunchConfiguration),
        "launch_ros": types.SimpleNamespace(),
        "launch_ros.actions": types.SimpleNamespace(Node=Recorder),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return {**{a.name: a.default for a in LAUNCH_ARGUMENTS}, **configuration}


def load_launch_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"launch_file_{path.stem.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "launch,args",
    [
        ("bimanual", {"sim": "true", "policy": "/tmp/p", "adapter": "joint_trajectory", "device": "cuda"}),
        ("bimanual", {"policy": "/tmp/p", "monitor": "true"}),
        ("sim", {"sim_backend": "kinematic"}),
    ],
)
def test_launch_files_start_exactly_the_bringup_node_set(monkeypatch, launch, args):
    context = fake_launch_modules(monkeypatch, args)
    desc = load_launch_file(LAUNCH_FILES[launch]).generate_launch_description()
    entities = desc.args[0]
    declared = [e for e in entities if "default_value" in e.kwargs]
    # every argument declared, with its default and description
    assert [(e.args[0], e.kwargs["default_value"]) for e in declared] == [(a.name, a.default) for a in LAUNCH_ARGUMENTS]
    assert all(len(e.kwargs["description"]) > 20 for e in declared)
    opaque = entities[-1]
    actions = opaque.kwargs["function"](context)
    nodes = [a.kwargs for a in actions if "executable" in a.kwargs]
    logs = [a.kwargs["msg"] for a in actions if "msg" in a.kwargs]
    specs, notes = node_set(context, launch=launch)
    assert [(n["package"], n["executable"], n["name"], n["namespace"]) for n in nodes] == [
        (s.package, s.executable, s.name, s.namespace) for s in specs
    ]
    for n, s in zip(nodes, specs):
        assert n["parameters"] == [*s.params_files, s.parameters]  # the overrides after the file
        assert n["additional_env"] == s.env
    assert logs == [f"qvla: {x}" for x in notes]


@pytest.mark.skipif(
    importlib.util.find_spec("launch_ros") is None,
    reason="launch_ros is not installable from the ROS 2 wheels; a ROS 2 install has it",
)
def test_real_launch_description():  # pragma: no cover - runs on machines with a ROS 2 install
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument

    for path in LAUNCH_FILES.values():
        desc = load_launch_file(path).generate_launch_description()
        names = [e.name for e in desc.entities if isinstance(e, DeclareLaunchArgument)]
        assert names == [a.name for a in LAUNCH_ARGUMENTS]
        ctx = LaunchContext()
        ctx.launch_configurations.update({"policy": "/tmp/p", "sim": "true"})
        for e in desc.entities:
            e.visit(ctx)


def test_node_set_for_sim_and_real():
    sim, _ = node_set({"sim": "true", "policy": "/tmp/p"})
    assert [s.name for s in sim] == ["sim_rig", "policy_node"]
    pol = sim[1]
    assert pol.parameters["safety.arm_profile"] == "sim" and pol.parameters["policy.path"] == "/tmp/p"
    assert sim[0].parameters["output.adapter"] == pol.parameters["output.adapter"] == "joint_state"
    real, _ = node_set({"policy": "/tmp/p", "adapter": "forward_command"})
    assert [s.name for s in real] == ["policy_node"] and real[0].parameters["safety.arm_profile"] == "real"
    assert real[0].fqn == "/qvla/policy_node"
    only_sim, _ = node_set({}, launch="sim")
    assert [s.name for s in only_sim] == ["sim_rig"]


def test_optional_nodes_are_hooks_with_notes():
    specs, notes = node_set({"policy": "/tmp/p", "monitor": "true", "rviz": "true"})
    assert [s.name for s in specs][0] == "policy_node"
    if importlib.util.find_spec("qvla_ros.nodes.monitor_node") is None:
        assert any("monitor" in n and "not available yet" in n for n in notes)


@pytest.mark.parametrize(
    "args,match",
    [
        ({"adapter": "can"}, "adapter:=can is not one of"),
        ({"sim": "maybe", "policy": "/p"}, "sim:=maybe is not one of"),
        ({"colour": "red"}, "unknown argument"),
        ({}, "policy:=DIR is required"),
        ({"policy": "/p", "params_file": "/nonexistent.yaml"}, "no such file"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(BringupError, match=match):
        node_set(args)


def test_command_line_puts_overrides_after_the_params_file():
    spec = node_set({"sim": "true", "policy": "/tmp/p"})[0][1]
    cmd = command_line(spec, python="python")
    assert cmd[:3] == ["python", "-m", "qvla_ros.nodes.policy_node"]
    i_file, i_p = cmd.index("--params-file"), cmd.index("-p")
    assert i_file < i_p and cmd[cmd.index("-r") + 1] == "__node:=policy_node" and "__ns:=/qvla" in cmd
    assert 'policy.path:="/tmp/p"' in cmd  # JSON-quoted: a path of digits stays a string


def test_parse_args_accepts_launch_style_and_flags():
    values, ns = parse_args(["sim:=true", "--policy", "/x", "--sim-backend", "kinematic", "--launch", "bimanual"])
    assert values == {"sim": "true", "policy": "/x", "sim_backend": "kinematic"} and ns.launch == "bimanual"
