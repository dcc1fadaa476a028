"""The node set of the two-arm rig, in one place, and `qvla-bringup`: a launch-free runner that starts it.

`ros2 launch qvla_ros bimanual.launch.py` (real robots) and `qvla-bringup` (CI, the demo, machines with the ROS 2
wheels, which have no `launch` / `launch_ros`) both take their nodes from `node_set()`: same executables, names,
namespace, parameter files and overrides. The runner starts each node as a process with the shared-memory DDS
profile (qvla_ros.dds), prefixes its output with the node's name, and on Ctrl-C (or SIGTERM) stops them in reverse
order: SIGINT, then SIGTERM, then SIGKILL after grace periods. If a node exits on its own, the others are stopped
too and the runner returns that node's exit code.

    qvla-bringup sim:=true policy:=models/pi0_w4          (launch-style arguments)
    qvla-bringup --sim true --policy models/pi0_w4        (the same, as flags)
    qvla-bringup --launch sim                             (only the simulated rig, as launch/sim.launch.py)
    qvla-bringup --launch record sim:=true dataset:=data/my_task episodes:=10 episode_time:=9
    qvla-bringup --launch calibrate policy:=models/sim_transfer_cube_fp    (the Calibrate action server)
    qvla-bringup sim:=true policy:=models/sim_transfer_cube_w4 monitor:=true reference:=models/sim_transfer_cube_fp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qvla_ros.control.arm_outputs import ARM_OUTPUTS
from qvla_ros.control.params import PARAMS_FILE

PACKAGE = "qvla_ros"
NAMESPACE = "qvla"


@dataclass(frozen=True)
class NodeSpec:
    """One node: what a launch_ros `Node` action and the runner both need."""

    name: str
    module: str  # `python -m <module>` (the runner)
    executable: str  # console script installed in lib/qvla_ros (launch_ros)
    package: str = PACKAGE
    namespace: str = NAMESPACE
    params_files: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict)  # overrides, applied after the files
    remappings: tuple[tuple[str, str], ...] = ()
    env: dict = field(default_factory=dict)  # extra environment variables
    description: str = ""
    arguments: tuple[str, ...] = ()  # command-line arguments before --ros-args (non-Python tools: rviz2, rqt)
    on_path: str = ""  # the runner's command on PATH when it differs from `executable` (rqt vs lib/rqt_gui/rqt_gui)

    @property
    def fqn(self) -> str:
        return f"/{self.namespace}/{self.name}" if self.namespace else f"/{self.name}"


@dataclass(frozen=True)
class LaunchArg:
    name: str
    default: str
    description: str
    choices: tuple[str, ...] = ()


LAUNCH_ARGUMENTS = (
    LaunchArg(
        "sim",
        "false",
        "true: the simulated rig (MuJoCo ALOHA scene) instead of real hardware; false: "
        "real arms and cameras, whose drivers you start yourself (see README)",
        ("true", "false"),
    ),
    LaunchArg(
        "policy", "", "policy directory: a π0 checkpoint or a qvla_quant artifact (required for the policy node)"
    ),
    LaunchArg("device", "cpu", "torch device for inference: cpu, cuda or cuda:N"),
    LaunchArg(
        "adapter",
        "joint_state",
        "arm command interface: joint_state, forward_command (ros2_control), "
        "joint_trajectory or y1 (IMETA vendor driver)",
        ARM_OUTPUTS,
    ),
    LaunchArg("params_file", "", "parameter file (default: the package's config/bimanual.yaml)"),
    LaunchArg(
        "sim_backend",
        "mujoco",
        "sim:=true only: mujoco (physics + rendering) or kinematic (no physics, synthetic images; for timing tests)",
        ("mujoco", "kinematic"),
    ),
    LaunchArg(
        "monitor",
        "false",
        "also start the monitor node: the full-precision reference on the policy's "
        "exact observations -> ActionDeviation (Eq. 4/5), diagnostics, gripper-path markers",
        ("true", "false"),
    ),
    LaunchArg(
        "reference",
        "",
        "monitor:=true: the full-precision reference policy directory (default: the source "
        "policy recorded in the running artifact, when it exists)",
    ),
    LaunchArg("reference_device", "", "monitor:=true: torch device of the reference (default: device)"),
    LaunchArg(
        "rviz",
        "false",
        "also start rviz2 with config/qvla.rviz: cameras and the monitor's markers (needs an "
        "rviz2 install; not part of the ROS 2 wheels)",
        ("true", "false"),
    ),
    LaunchArg(
        "rqt",
        "false",
        "also start rqt with config/qvla.perspective: plots of the monitor's deviations (needs "
        "an rqt install; not part of the ROS 2 wheels)",
        ("true", "false"),
    ),
    LaunchArg(
        "dataset",
        "",
        "record: the dataset directory episodes are recorded into (one rosbag2/MCAP episode "
        "per demonstration; an existing dataset is resumed)",
    ),
    LaunchArg(
        "episodes",
        "0",
        "record: record this many episodes back to back (episode_time each, reset_time "
        "between), then stop; 0 = start and stop them with EpisodeControl (~/episode) or the keys",
    ),
    LaunchArg("episode_time", "0", "record: seconds per episode (0 = until stopped)"),
    LaunchArg("reset_time", "5", "record: seconds of reset phase between episodes"),
    LaunchArg(
        "teleop",
        "auto",
        "sim:=true: the rig's scripted teleoperator publishes leader-arm commands (auto = "
        "on for the record launch, off otherwise)",
        ("auto", "true", "false"),
    ),
)
LAUNCHES = ("bimanual", "sim", "record", "calibrate")


def launch_description(launch: str):
    """The launch_ros description of `launch` (one of LAUNCHES): what launch/*.launch.py return.

    `launch`/`launch_ros` are imported here, not at module level: they exist in a ROS 2 install, not in the wheels
    the runner uses.
    """
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    def nodes(context, *args, **kwargs):
        values = {a.name: LaunchConfiguration(a.name).perform(context) for a in LAUNCH_ARGUMENTS}
        specs, notes = node_set(values, launch=launch)
        actions = [LogInfo(msg=f"qvla: {note}") for note in notes]
        for s in specs:
            actions.append(
                Node(
                    package=s.package,
                    executable=s.executable,
                    name=s.name,
                    namespace=s.namespace,
                    # the override dict comes after the file: launch_ros keys it by the node's full name, which
                    # outranks the file's shared /** block
                    parameters=[*s.params_files, dict(s.parameters)] if s.module else [],
                    remappings=list(s.remappings),
                    additional_env=dict(s.env),
                    output="screen",
                    **({"arguments": list(s.arguments)} if s.arguments else {}),
                )
            )
        return actions

    return LaunchDescription(
        [
            *[
                DeclareLaunchArgument(
                    a.name,
                    default_value=a.default,
                    description=a.description,
                    **({"choices": list(a.choices)} if a.choices else {}),
                )
                for a in LAUNCH_ARGUMENTS
            ],
            OpaqueFunction(function=nodes),
        ]
    )


class BringupError(ValueError):
    """A launch argument is invalid; the message names it and says what to do."""


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise BringupError(f"argument {name}:={value} must be true or false")


def default_params_file() -> str:
    from qvla_ros.paths import config_path

    return str(config_path(PARAMS_FILE))


def resolve_arguments(values: dict[str, str]) -> dict[str, str]:
    """Defaults filled in and every value checked; BringupError names the argument."""
    known = {a.name: a for a in LAUNCH_ARGUMENTS}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BringupError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = {a.name: str(values.get(a.name, a.default)) for a in LAUNCH_ARGUMENTS}
    for name, value in out.items():
        choices = known[name].choices
        if choices and value.lower() not in choices:
            raise BringupError(f"argument {name}:={value} is not one of {', '.join(choices)}")
    return out


def node_set(values: dict[str, str] | None = None, launch: str = "bimanual") -> tuple[list[NodeSpec], list[str]]:
    """The nodes to start for launch `bimanual`, `sim`, `record` or `calibrate` with these launch arguments, and notes
    for the user
    (optional nodes that are not available). Used by launch/*.launch.py and by the runner."""
    if launch not in LAUNCHES:
        raise BringupError(f"launch {launch!r} is not one of {', '.join(LAUNCHES)}")
    a = resolve_arguments(values or {})
    sim = (_as_bool("sim", a["sim"]) or launch == "sim") and launch != "calibrate"
    teleop = launch == "record" if a["teleop"] == "auto" else _as_bool("teleop", a["teleop"])
    params = a["params_file"] or default_params_file()
    if not Path(params).is_file():
        raise BringupError(f"argument params_file:={params}: no such file")
    shared = {"output.adapter": a["adapter"]}
    notes: list[str] = []
    nodes: list[NodeSpec] = []
    if sim:
        nodes.append(
            NodeSpec(
                name="sim_rig",
                module="qvla_ros.nodes.sim_rig_node",
                executable="qvla-sim-rig-node",
                params_files=(params,),
                parameters={**shared, "sim.backend": a["sim_backend"], "sim.teleop": teleop},
                # one software-rendering thread: llvmpipe's default of one per core would compete with the policy
                env={"LP_NUM_THREADS": "1"},
                description="simulated two-arm rig: cameras, arm states, commands in, episode reset/success",
            )
        )
    if launch == "bimanual":
        if not a["policy"]:
            raise BringupError(
                "argument policy:=DIR is required: the policy directory or qvla_quant artifact to "
                "run (for a first try: make demo, or --random-policy in python -m qvla_ros.demo)"
            )
        nodes.append(
            NodeSpec(
                name="policy_node",
                module="qvla_ros.nodes.policy_node",
                executable="qvla-policy-node",
                params_files=(params,),
                parameters={
                    **shared,
                    "policy.path": str(Path(a["policy"]).expanduser().resolve()),
                    "policy.device": a["device"],
                    "safety.arm_profile": "sim" if sim else "real",
                },
                description="cameras + arm states -> policy -> 30 Hz safe arm commands",
            )
        )
        if _as_bool("monitor", a["monitor"]):
            if importlib.util.find_spec("qvla_ros.nodes.monitor_node") is not None:
                reference = a["reference"] or recorded_source(a["policy"])
                if reference and not a["reference"]:
                    notes.append(f"monitor: reference {reference} (the policy the artifact was made from)")
                mon = {**shared, "monitor.device": a["reference_device"] or a["device"]}
                if reference:  # else the node refuses to start, naming monitor.reference_path
                    mon["monitor.reference_path"] = str(Path(reference).expanduser().resolve())
                nodes.append(
                    NodeSpec(
                        name="monitor",
                        module="qvla_ros.nodes.monitor_node",
                        executable="qvla-monitor-node",
                        params_files=(params,),
                        parameters=mon,
                        description="ActionDeviation of the quantized policy vs full precision",
                    )
                )
            else:
                notes.append("monitor:=true ignored: the ActionDeviation monitor node is not available")
        if _as_bool("rviz", a["rviz"]):
            if shutil.which("rviz2"):
                nodes.append(
                    NodeSpec(
                        name="rviz",
                        module="",
                        executable="rviz2",
                        package="rviz2",
                        arguments=("-d", _config_file("qvla.rviz")),
                        description="visualization: cameras and the monitor's gripper paths",
                    )
                )
            else:
                notes.append(
                    "rviz:=true ignored: rviz2 is not installed (it is not part of the ROS 2 wheels; "
                    "install ros-<distro>-rviz2, then open config/qvla.rviz)"
                )
        if _as_bool("rqt", a["rqt"]):
            if shutil.which("rqt"):
                nodes.append(
                    NodeSpec(
                        name="rqt",
                        module="",
                        executable="rqt_gui",
                        package="rqt_gui",
                        on_path="rqt",
                        arguments=("--perspective-file", _config_file("qvla.perspective")),
                        description="plots of the monitor's ActionDeviation fields",
                    )
                )
            else:
                notes.append(
                    "rqt:=true ignored: rqt is not installed (it is not part of the ROS 2 wheels; install "
                    "ros-<distro>-rqt and ros-<distro>-rqt-plot, then load config/qvla.perspective)"
                )
    if launch == "record":
        if not a["dataset"]:
            raise BringupError("argument dataset:=DIR is required: the dataset directory to record episodes into")
        episodes, episode_time, reset_time = (
            _number(a, "episodes", int),
            _number(a, "episode_time", float),
            _number(a, "reset_time", float),
        )
        rec = {"recorder.dataset": str(Path(a["dataset"]).expanduser().resolve())}
        if episodes:
            if not episode_time:
                raise BringupError(f"argument episodes:={episodes} needs episode_time:=SECONDS (how long each one is)")
            rec.update(
                {"recorder.auto_start": True, "recorder.num_episodes": episodes, "recorder.exit_when_done": True}
            )
        rec.update({"recorder.episode_time": episode_time, "recorder.reset_time": reset_time})
        if sim:
            rec.update(
                {
                    "recorder.rig_service": "/qvla/sim/episode",
                    "recorder.rig": "simulated rig (sim_rig node)",
                    "recorder.teleoperator": "scripted expert (sim.teleop)" if teleop else "",
                }
            )
        nodes.append(
            NodeSpec(
                name="recorder",
                module="qvla_ros.nodes.recorder_node",
                executable="qvla-recorder-node",
                params_files=(params,),
                parameters=rec,
                description="teleop demonstrations -> one rosbag2/MCAP episode each",
            )
        )
    if launch == "calibrate":
        cal = {}
        if a["policy"]:
            cal["calibration.policy"] = str(Path(a["policy"]).expanduser().resolve())
        nodes.append(
            NodeSpec(
                name="calibration",
                module="qvla_ros.nodes.calibration_node",
                executable="qvla-calibration-node",
                params_files=(params,),
                parameters=cal,
                description="the Calibrate action: recordings -> validated artifact -> reload",
            )
        )
    return nodes, notes


def _number(a: dict, name: str, kind):
    try:
        value = kind(a[name])
    except ValueError:
        raise BringupError(f"argument {name}:={a[name]} must be a {'whole ' if kind is int else ''}number") from None
    if value < 0:
        raise BringupError(f"argument {name}:={a[name]} must be >= 0")
    return value


def _config_file(name: str) -> str:
    from qvla_ros.paths import config_path

    return str(config_path(name))


def recorded_source(policy: str) -> str:
    """The float policy a qvla_quant artifact was made from (its artifact.json `extra.policy_source`), when that
    directory exists (as given, or relative to the working directory); '' otherwise."""
    # imported here: qvla_quant imports torch (~2 s), which only launches that look up a reference policy need
    from qvla_quant.files import is_artifact
    from qvla_quant.files import recorded_source as artifact_source

    if not is_artifact(policy):
        return ""
    source = artifact_source(policy)
    return source if source and Path(source).expanduser().is_dir() else ""


# ---------------------------------------------------------------- the runner
def _param_value(v) -> str:
    return json.dumps(v)  # JSON is YAML: strings stay strings ("123"), lists and booleans parse as such


def command_line(spec: NodeSpec, python: str = sys.executable) -> list[str]:
    """How the runner starts `spec`: python -m module --ros-args (name, namespace, params file, -p overrides)."""
    if spec.module:
        cmd = [python, "-m", spec.module]
    else:
        exe = shutil.which(spec.on_path or spec.executable)
        if exe is None:
            raise BringupError(f"{spec.on_path or spec.executable} is not on PATH")
        cmd = [exe]
    cmd += list(spec.arguments)
    cmd += ["--ros-args", "-r", f"__node:={spec.name}"]
    if spec.namespace:
        cmd += ["-r", f"__ns:=/{spec.namespace}"]
    for f in spec.params_files:
        cmd += ["--params-file", f]
    for k, v in spec.parameters.items():  # after the files: a later -p wins over the files' /** block
        cmd += ["-p", f"{k}:={_param_value(v)}"]
    for src, dst in spec.remappings:
        cmd += ["-r", f"{src}:={dst}"]
    return cmd


def node_environment(spec: NodeSpec, domain_id: int | None = None, base: dict | None = None) -> dict[str, str]:
    from qvla_ros.dds import local_dds_environment

    env = local_dds_environment(domain_id, base)
    env.update(spec.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # a source checkout runs its own modules, installed or not
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the runner dies without cleaning up (e.g. SIGKILL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Bringup:
    """Start the node set as processes; stop them cleanly. `output`: a text stream for the prefixed node output
    (default stdout), or None to discard it."""

    def __init__(
        self, specs: list[NodeSpec], domain_id: int | None = None, output=sys.stdout, base_env: dict | None = None
    ):
        self.specs = list(specs)
        self.domain_id = domain_id
        self.output = output
        self.base_env = base_env
        self.procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._out_lock = threading.Lock()

    def start(self) -> Bringup:
        for spec in self.specs:
            cmd = command_line(spec)
            p = subprocess.Popen(
                cmd,
                env=node_environment(spec, self.domain_id, self.base_env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.procs[spec.name] = p
            t = threading.Thread(target=self._forward, args=(spec.name, p), daemon=True)
            t.start()
            self._threads.append(t)
            self._say(f"started {spec.name} (pid {p.pid}): {' '.join(cmd)}")
        return self

    def _say(self, line: str) -> None:
        if self.output is not None:
            with self._out_lock:
                self.output.write(f"[bringup] {line}\n")
                self.output.flush()

    def _forward(self, name: str, p: subprocess.Popen) -> None:
        width = max(len(s.name) for s in self.specs)
        for raw in iter(p.stdout.readline, b""):
            if self.output is not None:
                with self._out_lock:
                    self.output.write(f"[{name:<{width}}] {raw.decode(errors='replace').rstrip()}\n")
                    self.output.flush()

    def exited(self) -> dict[str, int]:
        """Nodes that have exited, with their exit codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def wait(self, stop: threading.Event | None = None) -> int:
        """Until a node exits or `stop` is set; then stop all. Returns the first exit code (0 when stopped)."""
        rc = 0
        while not (stop is not None and stop.is_set()):
            done = self.exited()
            if done:
                name, rc = next(iter(done.items()))
                self._say(f"{name} exited with code {rc}; stopping the others")
                break
            time.sleep(0.1)
        self.stop()
        return rc

    def stop(self, grace: float = 10.0) -> None:
        """SIGINT (rclpy shuts down cleanly), then SIGTERM, then SIGKILL, in reverse start order."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            alive = [(n, p) for n, p in reversed(list(self.procs.items())) if p.poll() is None]
            if not alive:
                break
            for _, p in alive:
                try:
                    os.killpg(p.pid, sig)  # the node and its inference worker process
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            for _, p in alive:
                try:
                    p.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if sig != signal.SIGINT:
                names = [n for n, p in alive]
                self._say(f"sent {signal.Signals(sig).name} to {', '.join(names)}")
        for t in self._threads:
            t.join(timeout=2.0)

    def __enter__(self) -> Bringup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, str], argparse.Namespace]:
    """Launch-style `name:=value` tokens and `--name value` flags, the same arguments as the launch files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values: dict[str, str] = {}
    rest = []
    for tok in argv:
        if ":=" in tok and not tok.startswith("-"):
            k, v = tok.split(":=", 1)
            values[k] = v
        else:
            rest.append(tok)
    ap = argparse.ArgumentParser(
        prog="qvla-bringup",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="arguments (also as name:=value):\n"
        + "\n".join(f"  {a.name:<12} {a.description} (default: {a.default or 'none'})" for a in LAUNCH_ARGUMENTS),
    )
    for a in LAUNCH_ARGUMENTS:
        ap.add_argument(f"--{a.name.replace('_', '-')}", dest=a.name, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--launch", default="bimanual", choices=LAUNCHES, help="which launch file's node set")
    ap.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID for the nodes (default: inherited)")
    ap.add_argument("--print", action="store_true", help="print the node set and command lines, start nothing")
    ns = ap.parse_args(rest)
    for a in LAUNCH_ARGUMENTS:
        if getattr(ns, a.name) is not None:
            values[a.name] = getattr(ns, a.name)
    return values, ns


def main(argv: list[str] | None = None) -> int:
    values, ns = parse_args(argv)
    try:
        specs, notes = node_set(values, launch=ns.launch)
    except BringupError as e:
        print(f"qvla-bringup: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"[bringup] note: {n}", flush=True)
    if ns.print:
        for s in specs:
            print(f"{s.fqn}: {' '.join(command_line(s))}")
        return 0
    print("[bringup] real robots: use `ros2 launch qvla_ros bimanual.launch.py` with the same arguments", flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    runner = Bringup(specs, domain_id=ns.domain_id).start()
    rc = runner.wait(stop)
    print(f"[bringup] stopped (exit code {rc})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
