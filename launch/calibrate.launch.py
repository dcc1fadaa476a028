"""ros2 launch qvla_ros calibrate.launch.py [policy:=FP_POLICY_DIR]

The calibration node: the Calibrate action on /qvla/calibration/calibrate (recordings -> sensitivities -> bit
allocation -> packed artifact, validated against full precision on held-out episodes, optionally hot-reloaded into the
running policy node). Start it beside bimanual.launch.py. The node set and every argument come from qvla_ros.bringup,
which `qvla-bringup --launch calibrate` (the launch-free runner) uses too.
"""

from qvla_ros.bringup import launch_description


def generate_launch_description():
    return launch_description("calibrate")
