"""qvla's ROS 2 nodes (thin: messages, timers, parameters) and the few rclpy helpers they share.

    policy_node       three cameras + arm states -> inference worker -> chunk scheduler -> 30 Hz safe arm commands
    sim_rig_node      the simulated rig on the same topics as the real one (cameras, arm states, commands; the
                      scripted teleoperator on the leader-arm topics)
    monitor_node      the full-precision reference on the policy's exact observations -> ActionDeviation, markers
    recorder_node     teleoperated demonstrations -> one rosbag2/MCAP episode each, from the raw messages
    calibration_node  the Calibrate action: recordings -> sensitivities -> allocation -> artifact -> reload

The decisions (sync, blending, safety, arm outputs, parameter validation, the policy node's control loop) live in
qvla_ros.control, without rclpy.
"""

from __future__ import annotations

import sys
from typing import Any

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from qvla_ros.control.params import ParameterError, Schema

_PTYPES = {
    "string": ParameterType.PARAMETER_STRING,
    "integer": ParameterType.PARAMETER_INTEGER,
    "double": ParameterType.PARAMETER_DOUBLE,
    "bool": ParameterType.PARAMETER_BOOL,
    "string_array": ParameterType.PARAMETER_STRING_ARRAY,
    "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
    "bool_array": ParameterType.PARAMETER_BOOL_ARRAY,
}


def qos(name: str, depth: int | None = None) -> QoSProfile:
    """The QoS profiles named in config/topics.yaml."""
    if name == "sensor_data":
        p = QoSProfile(
            depth=qos_profile_sensor_data.depth,
            reliability=ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.VOLATILE,
        )
    elif name == "reliable":
        p = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
    elif name == "transient_local":
        p = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    else:
        raise ValueError(f"unknown QoS profile name {name!r}")
    if depth is not None:
        p.depth = depth
    return p


def to_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def declare_schema(node: Node, schema: Schema, defaults: dict[str, Any]) -> dict[str, Any]:
    """Declare every parameter of `schema` with its type, description and range (defaults from the parameter file;
    --params-file / -p overrides apply), then validate the values. ParameterError names the parameter."""
    for spec in schema.specs:
        d = ParameterDescriptor(
            name=spec.name, type=_PTYPES[spec.type], description=spec.description, read_only=not spec.dynamic
        )
        if spec.range is not None and spec.type == "double":
            d.floating_point_range = [
                FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]))
            ]
        elif spec.range is not None and spec.type == "integer":
            d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]))]
        if spec.choices:
            d.additional_constraints = f"one of: {', '.join(spec.choices)}"
        try:
            node.declare_parameter(spec.name, defaults[spec.name], d)
        except Exception as e:  # rclpy raises several types for a wrongly typed or out-of-range override
            raise ParameterError(f"parameter {spec.name}: {e} ({spec.description})") from None
    values = {s.name: node.get_parameter(s.name).value for s in schema.specs}
    return schema.validate(
        {k: (list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v) for k, v in values.items()}
    )


def guard_dynamic(schema: Schema, current: dict[str, Any]):
    """An on-set-parameters callback that accepts only dynamic parameters with valid values (others: restart)."""

    def callback(params) -> SetParametersResult:
        update = dict(current)
        for p in params:
            try:
                spec = schema.spec(p.name)
            except ParameterError as e:
                return SetParametersResult(successful=False, reason=str(e))
            if not spec.dynamic:
                return SetParametersResult(
                    successful=False,
                    reason=f"{p.name} is fixed at start-up: restart the node (or relaunch) to change it",
                )
            value = p.value
            update[p.name] = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else value
        try:
            schema.validate(update)
        except ParameterError as e:
            return SetParametersResult(successful=False, reason=str(e))
        return SetParametersResult(successful=True)

    return callback


def fail(node_name: str, error: Exception) -> int:
    """A start-up error a user can act on: one clear line on stderr, exit code 2, no traceback."""
    print(f"[{node_name}] cannot start: {error}", file=sys.stderr, flush=True)
    return 2


def spin(executor) -> None:
    """Spin `executor` until Ctrl-C or shutdown. Ctrl-C shuts the context down under executors that spin in other
    threads (rclpy raises RCLError "context is not valid" there): expected at shutdown, re-raised otherwise."""
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise


def run_node(
    node_name: str,
    make_node,
    startup_errors: tuple[type[BaseException], ...],
    make_executor,
    is_startup_error=None,
    argv: list[str] | None = None,
) -> int:
    """The whole life of a node process with one executor: init, build the node (a start-up error a user can act
    on ends it with `fail`: one line, exit code 2), spin until Ctrl-C or shutdown, then shut the node down.

    make_node / make_executor: called after rclpy.init. is_startup_error: a further test for errors of classes
    that cannot be named here (e.g. those of a module imported only when the node starts)."""
    rclpy.init(args=argv)
    node = None
    try:
        try:
            node = make_node()
        except startup_errors as e:
            return fail(node_name, e)
        except Exception as e:
            if is_startup_error is not None and is_startup_error(e):
                return fail(node_name, e)
            raise
        executor = make_executor()
        executor.add_node(node)
        spin(executor)
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
