"""Record scripted demonstrations on the simulated rig as episodes (rosbag2 + MCAP, config/topics.yaml topics).

Per episode: the instruction and metadata at t = 0; both arms' joint states at every 50 Hz physics tick; the
three camera frames the expert saw at every 30 Hz command tick (stamped with their physics time); the 30 Hz
command stream; then the success flag and the final metadata (rig timing included). Stamps are sim time from
SIM_EPOCH_NS, so one seed always gives the same episode.

An episode is written in a hidden `.partial/` folder and moved into place when it is complete and kept, so an
output directory only ever lists finished, successful demonstrations.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvla_ros.episodes.topics import TopicConfig, load_topic_config
from qvla_ros.episodes.writer import EpisodeWriter, sim_stamp_ns
from qvla_ros.sim.expert import EXPERT_VERSION, TransferCubeExpert, run_expert_episode
from qvla_ros.sim.rig import SimRig, sample_object_poses

PARTIAL_DIR = ".partial"


@dataclass
class RecordResult:
    path: Path | None  # None when the episode failed and was discarded
    seed: int
    success: bool
    max_reward: int
    wall_s: float
    bytes: int


def _metadata(rig: SimRig, expert: TransferCubeExpert, seed: int) -> dict:
    return {
        "source": "sim",
        "rig": "gym-aloha bimanual ViperX (MuJoCo) standing in for two IMETA-Y1 arms",
        "task": rig.task,
        "seed": int(seed),
        "instruction": rig.instruction,
        "teleoperator": f"scripted expert {EXPERT_VERSION}",
        "image_size": list(rig.image_size),
        "control_hz": rig.control_hz,
        "command_hz": rig.command_hz,
        "command_mode": rig.command_mode,
        "duration_s": expert.duration,
        "time_base": "sim time since reset, from SIM_EPOCH_NS",
        # privileged ground truth a real recording lacks: each object's initial pose (xyz + wxyz quaternion),
        # for training aids such as the policy trainer's auxiliary localization loss
        "initial_object_poses": sample_object_poses(rig.task, seed).reshape(-1, 7).tolist(),
    }


def record_episode(
    path: str | Path,
    seed: int,
    rig: SimRig,
    expert: TransferCubeExpert | None = None,
    topics: TopicConfig | None = None,
    keep_failed: bool = False,
    compress: bool = True,
) -> RecordResult:
    """Play the expert on `seed` and write the episode to `path` (discarded on failure unless keep_failed)."""
    path = Path(path)
    cfg = topics or load_topic_config()
    missing = [c for c in cfg.camera_names if c not in rig.camera_names]
    if missing:
        raise ValueError(f"the rig does not render camera(s) {missing} listed in {cfg.source}")
    expert = expert or TransferCubeExpert()
    # Staged in a hidden folder under the same name (rosbags names the .mcap file after its directory).
    partial = path.parent / PARTIAL_DIR / path.name
    if partial.exists():
        shutil.rmtree(partial)  # left over from a crashed run of ours: never a finished episode
    if path.exists():
        raise FileExistsError(f"{path} exists already: episodes are never overwritten")

    t0 = time.perf_counter()
    writer = EpisodeWriter(partial, cfg, metadata=_metadata(rig, expert, seed), compress=compress)
    with writer:

        def on_physics(r: SimRig) -> None:
            if r.time == 0.0:
                stamp = sim_stamp_ns(0.0)
                writer.write_metadata(stamp)
                writer.write_instruction(stamp, r.instruction)
            writer.write_state(sim_stamp_ns(r.time), r.qpos(), r.qvel())

        def on_tick(t: float, obs, command: np.ndarray) -> None:
            stamp = sim_stamp_ns(obs.time)
            for cam in cfg.camera_names:
                writer.write_image(cam, stamp, obs.images[cam])
            writer.write_command(sim_stamp_ns(t), command)

        result = run_expert_episode(rig, seed, expert, on_tick=on_tick, on_physics=on_physics)
        success = result.success
        writer.finish(
            sim_stamp_ns(rig.time),
            success=success,
            metadata={
                "max_reward": result.max_reward,
                "success_at_end": result.success_at_end,
                "timing": rig.timing().as_dict(),
            },
        )
    size = sum(f.stat().st_size for f in partial.iterdir())
    wall = time.perf_counter() - t0
    if not success and not keep_failed:
        shutil.rmtree(partial)
        return RecordResult(None, seed, False, result.max_reward, wall, 0)
    partial.rename(path)
    try:
        partial.parent.rmdir()
    except OSError:
        pass  # another episode is being staged there
    return RecordResult(path, seed, success, result.max_reward, wall, size)
