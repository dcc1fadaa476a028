"""The scripted teleoperator: 30 Hz joint commands that solve transfer-cube in the joint-space task."""

from __future__ import annotations

import numpy as np
import pytest

from qvla_ros.sim.expert import TransferCubeExpert, command_times, evaluate_expert, run_expert_episode
from qvla_ros.sim.rig import SimRig

pytestmark = pytest.mark.sim


def test_expert_succeeds_on_a_fixed_seed():
    rig = SimRig(camera_names=())
    expert = TransferCubeExpert()
    result = run_expert_episode(rig, seed=0, expert=expert, render=False)
    assert result.success and result.success_at_end and result.max_reward == 4
    # the IK reached every fingertip waypoint (a silent IK failure would make demos jerky)
    assert expert.max_ik_error < 0.002


def test_expert_commands_are_a_smooth_30hz_joint_stream():
    rig = SimRig(camera_names=())
    result = run_expert_episode(rig, seed=1, render=False)
    assert result.commands.shape == (240, 14)
    np.testing.assert_allclose(np.diff(result.command_times), 1 / 30)
    assert np.all((result.commands[:, [6, 13]] >= 0) & (result.commands[:, [6, 13]] <= 1))
    # no joint moves more than a leader arm could in one 33 ms period (4.5 rad/s)
    assert np.abs(np.diff(result.commands[:, [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]], axis=0)).max() < 0.15
    # the recorded commands replay to the same result (what is recorded is exactly what succeeded)
    replay = SimRig(camera_names=())
    replay.reset(seed=1)
    for t, q in zip(result.command_times, result.commands):
        replay.step_to(t)
        replay.command(q, stamp=t)
    replay.step_to(8.0)
    assert replay.episode_success


def test_command_times():
    t = command_times(1.0, 30)
    assert len(t) == 30 and t[0] == 0 and t[-1] == pytest.approx(29 / 30)


def test_expert_success_over_a_few_seeds():
    results = evaluate_expert(range(100, 105))
    assert sum(r.success for r in results) >= 4


def test_expert_refuses_other_tasks():
    rig = SimRig(task="insertion", camera_names=())
    rig.reset(seed=0)
    with pytest.raises(ValueError, match="transfer_cube"):
        TransferCubeExpert().reset(rig)
