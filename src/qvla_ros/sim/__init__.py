"""The simulated two-arm rig (MuJoCo ALOHA scene), its kinematic stand-in without physics (kinematic_rig), its
scripted teleoperator, and demo recording. No ROS.

MuJoCo chooses its OpenGL backend when `mujoco` is first imported. Every module of this package imports this
file first, so a headless default (EGL) is set here, before that, when MUJOCO_GL is unset and there is no
display. SimRig raises a RigError that says what to install or set when no backend can render.
"""

import os
import sys

GL_WAS_SET = "MUJOCO_GL" in os.environ
MUJOCO_IMPORTED_FIRST = "mujoco" in sys.modules
if not GL_WAS_SET and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ["MUJOCO_GL"] = "egl"
