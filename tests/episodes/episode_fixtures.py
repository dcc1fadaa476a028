"""Synthetic episodes with known content, written through EpisodeWriter (no MuJoCo needed).

A helper module with a unique name (tests import it directly; `conftest` would be ambiguous)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvla_ros.episodes import EpisodeWriter, load_topic_config, sim_stamp_ns

COMMAND_HZ = 30
STATE_DT = 0.02  # 50 Hz, like the sim


@dataclass
class Truth:
    """What was written: one image per camera per command tick, 50 Hz states, 30 Hz commands."""

    path: Path
    cmd_t: np.ndarray  # [K] s
    commands: np.ndarray  # [K, 14]
    state_t: np.ndarray  # [S] s
    states: np.ndarray  # [S, 14]
    image_t: np.ndarray  # [K] s, stamp of the frame seen at command tick k
    images: dict  # camera -> [K, H, W, 3]
    instruction: str


def write_synthetic(
    path: Path,
    ticks: int = 30,
    size=(12, 16),
    seed: int = 0,
    cameras=None,
    freeze_camera_after: dict | None = None,
    finish: bool = True,
    **writer_kw,
) -> Truth:
    cfg = load_topic_config()
    cameras = tuple(cameras or cfg.camera_names)
    rng = np.random.default_rng(seed)
    cmd_t = np.arange(ticks) / COMMAND_HZ
    duration = ticks / COMMAND_HZ
    state_t = np.arange(int(np.floor(duration / STATE_DT)) + 1) * STATE_DT
    commands = rng.normal(size=(ticks, 14))
    states = rng.normal(size=(len(state_t), 14))
    # the frame of tick k is rendered at the last physics tick not after it (as in the sim recorder)
    image_t = np.floor(cmd_t / STATE_DT + 1e-9) * STATE_DT
    images = {c: rng.integers(0, 256, size=(ticks, *size, 3), dtype=np.uint8) for c in cameras}
    instruction = "put the synthetic cube somewhere"
    w = EpisodeWriter(path, cfg, metadata={"source": "test", "seed": seed}, **writer_kw).open()
    w.write_metadata(sim_stamp_ns(0.0))
    w.write_instruction(sim_stamp_ns(0.0), instruction)
    si = 0
    for k, t in enumerate(cmd_t):
        while si < len(state_t) and state_t[si] <= t + 1e-9:
            w.write_state(sim_stamp_ns(state_t[si]), states[si], states[si] * 0.1)
            si += 1
        for c in cameras:
            if freeze_camera_after and c in freeze_camera_after and t > freeze_camera_after[c]:
                continue
            w.write_image(c, sim_stamp_ns(image_t[k]), images[c][k])
        w.write_command(sim_stamp_ns(t), commands[k])
    while si < len(state_t):
        w.write_state(sim_stamp_ns(state_t[si]), states[si])
        si += 1
    if finish:
        w.finish(sim_stamp_ns(duration), success=True, metadata={"duration_s": duration})
    else:
        w.close()
    return Truth(path, cmd_t, commands, state_t, states, image_t, images, instruction)


def expected_sample(truth: Truth, k: int, horizon: int):
    """The sample the reader must produce for command tick k."""
    t = truth.cmd_t[k]
    si = int(np.searchsorted(truth.state_t, t + 1e-9, side="right")) - 1
    j = np.minimum(np.arange(k, k + horizon), len(truth.cmd_t) - 1)
    return {c: v[k] for c, v in truth.images.items()}, truth.states[si], truth.commands[j]
