"""What a policy sees and returns on the robot side, independent of ROS and of the model family.

The policy node turns synchronized ROS messages into an `Observation`, hands it to a `PolicyRuntime`
(qvla_ros.policy.runtime) off the control loop, and plays out the returned `PredictedChunk` at 30 Hz.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Observation:
    """One synchronized snapshot of the rig.

    images: camera name -> HxWx3 uint8 RGB (any size: the policy resizes); the names are the policy's
        `camera_names` (e.g. "top", "left_wrist", "right_wrist").
    state: float64 [n_joints] joint positions in the policy's `joint_names` order (left arm 6 + gripper, then
        right arm 6 + gripper for the bimanual rig).
    instruction: the task in words.
    stamp: seconds (ROS time of the newest input the observation was built from).
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str
    stamp: float = 0.0


@dataclass
class PredictedChunk:
    """A chunk of future joint-position targets predicted from one observation.

    actions: float64 [horizon, n_joints] absolute targets in `joint_names` order, row k meant for time
        `stamp + k * step_period` (k = 0 is the first command to send after the observation).
    latency: seconds spent in `predict` (preprocessing + model + postprocessing).
    """

    actions: np.ndarray
    step_period: float
    stamp: float
    latency: float
    model_id: str
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[0])
