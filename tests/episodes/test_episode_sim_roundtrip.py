"""A demonstration recorded on the simulated rig reads back as exactly what the teleoperator saw and sent."""

from __future__ import annotations

import numpy as np
import pytest
from mcap.reader import make_reader

from qvla_ros.episodes import read_episode
from qvla_ros.sim.expert import TransferCubeExpert, run_expert_episode
from qvla_ros.sim.record import record_episode
from qvla_ros.sim.rig import SimRig

pytestmark = pytest.mark.sim

SIZE = (48, 64)
DURATION = 1.5


def test_recorded_sim_episode_round_trips(tmp_path):
    rig = SimRig(image_size=SIZE)
    res = record_episode(
        tmp_path / "ep", seed=4, rig=rig, expert=TransferCubeExpert(duration=DURATION), keep_failed=True
    )
    assert res.path == tmp_path / "ep" and not res.success  # 1.5 s is too short to finish the task
    assert not (tmp_path / ".partial").exists()

    # The same seed replayed (the rig is deterministic): what the expert saw and sent at each 30 Hz tick.
    seen = []
    run_expert_episode(
        rig, 4, TransferCubeExpert(duration=DURATION), on_tick=lambda t, obs, cmd: seen.append((t, obs, cmd.copy()))
    )
    horizon = 10
    ep = read_episode(res.path, horizon=horizon)
    assert len(ep) == len(seen) == round(DURATION * 30) and ep.dropped == {}
    assert ep.success is False and ep.metadata["seed"] == 4 and ep.metadata["image_size"] == list(SIZE)
    assert ep.instruction == rig.instruction
    commands = np.array([c for _, _, c in seen])
    for k, (s, (t, obs, _)) in enumerate(zip(ep.samples, seen)):
        assert s.timestamp == pytest.approx(t, abs=1e-9)
        for cam in ("top", "left_wrist", "right_wrist"):
            np.testing.assert_array_equal(s.images[cam], obs.images[cam])
        np.testing.assert_array_equal(s.state, obs.qpos)
        j = np.minimum(np.arange(k, k + horizon), len(seen) - 1)
        np.testing.assert_array_equal(s.actions, commands[j])

    # the independent MCAP reader sees every stream at its rate: 30 Hz cameras and commands, 50 Hz states
    with open(next(res.path.glob("*.mcap")), "rb") as f:
        summary = make_reader(f).get_summary()
    counts = {c.topic: summary.statistics.channel_message_counts[c.id] for c in summary.channels.values()}
    assert counts["/camera_high/color/image_raw"] == 45 and counts["/qvla/master_arm_left/joint_states"] == 45
    assert counts["/qvla/puppet_arm_right/joint_states"] == round(DURATION * 50) + 1
    assert counts["/qvla/episode/success"] == 1
