"""ros2 launch qvla_ros sim.launch.py [adapter:=joint_trajectory] [sim_backend:=kinematic]

The simulated two-arm rig alone (cameras, arm states, command input, episode reset/success), for driving it with
your own nodes or a teleoperator. The node set and every argument come
from qvla_ros.bringup, which `qvla-bringup` (the launch-free runner used by CI and `make demo`) uses as well.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from qvla_ros.bringup import LAUNCH_ARGUMENTS, node_set

LAUNCH = "sim"


def _nodes(context, *args, **kwargs):
    values = {a.name: LaunchConfiguration(a.name).perform(context) for a in LAUNCH_ARGUMENTS}
    specs, notes = node_set(values, launch=LAUNCH)
    actions = [LogInfo(msg=f"qvla: {note}") for note in notes]
    for s in specs:
        actions.append(Node(
            package=s.package, executable=s.executable, name=s.name, namespace=s.namespace,
            # the override dict comes after the file: launch_ros keys it by the node's full name, which outranks
            # the file's shared /** block
            parameters=[*s.params_files, dict(s.parameters)] if s.module else [],
            remappings=list(s.remappings), additional_env=dict(s.env), output="screen",
        ))
    return actions


def generate_launch_description():
    return LaunchDescription([
        *[DeclareLaunchArgument(a.name, default_value=a.default, description=a.description,
                                **({"choices": list(a.choices)} if a.choices else {}))
          for a in LAUNCH_ARGUMENTS],
        OpaqueFunction(function=_nodes),
    ])
