"""ros2 launch qvla_ros bimanual.launch.py [sim:=true] policy:=DIR [device:=cuda] [adapter:=y1] [monitor:=true] ...

The two-arm rig driven by a QVLA-quantized policy at 30 Hz: the policy node, plus the simulated rig with sim:=true
(with sim:=false, start the arm and camera drivers yourself: see the README). monitor:=true [reference:=FP_DIR]
[reference_device:=cuda:1] adds the monitor node (ActionDeviation of the policy vs its full-precision reference);
rviz:=true / rqt:=true open config/qvla.rviz / config/qvla.perspective where rviz2 / rqt are installed.
The node set and every argument come from qvla_ros.bringup, which `qvla-bringup` (the launch-free runner used by CI
and `make demo`) uses as well.
"""

from qvla_ros.bringup import launch_description


def generate_launch_description():
    return launch_description("bimanual")
