"""ros2 launch qvla_ros sim.launch.py [adapter:=joint_trajectory] [sim_backend:=kinematic]

The simulated two-arm rig alone (cameras, arm states, command input, episode reset/success), for driving it with
your own nodes or a teleoperator. The node set and every argument come
from qvla_ros.bringup, which `qvla-bringup` (the launch-free runner used by CI and `make demo`) uses as well.
"""

from qvla_ros.bringup import launch_description


def generate_launch_description():
    return launch_description("sim")
