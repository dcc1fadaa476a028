"""Simulated rig benchmark: physics step and camera rendering time per control tick, and the scripted expert's
success rate.

Reproduce (headless; MUJOCO_GL=egl is set when unset):

    .venv/bin/python bench/bench_sim.py --seeds 50
    .venv/bin/python bench/bench_sim.py --seeds 50 --sizes 240x320 480x640 --gym-aloha   # with the stock wrapper

Timing runs one scripted episode per configuration (seed 0, 8 s = 400 physics ticks), rendering every camera at
every 50 Hz tick, and reports per-tick means and 95th percentiles. "real-time load" is the wall time one second
of simulation costs in the rig's real use: 50 physics ticks plus 30 renders (cameras at the command rate).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qvla_ros.sim.expert import TransferCubeExpert, evaluate_expert, run_expert_episode  # noqa: E402
from qvla_ros.sim.rig import DEFAULT_CAMERAS, SimRig  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def time_rig(size: tuple[int, int], cameras: tuple[str, ...]) -> dict:
    rig = SimRig(image_size=size, camera_names=cameras)
    rig.reset(seed=0)
    rig.observe()  # creates the GL context outside the measurement
    run_expert_episode(
        rig, 0, TransferCubeExpert(), render=False, on_physics=(lambda r: r.observe()) if cameras else None
    )
    t = rig.timing()
    rig.close()
    step, render = t.step_ms, t.render_ms
    render_mean = render.get("mean", 0.0)
    render_p95 = render.get("p95", 0.0)
    return {
        "config": f"{size[0]}x{size[1]} x {len(cameras)} cam" if cameras else "physics only",
        "step": (step["mean"], step["p95"]),
        "render": (render_mean, render_p95),
        "tick": step["mean"] + render_mean,
        "load": (50 * step["mean"] + 30 * render_mean) / 1000.0,
        "ticks": t.ticks,
    }


def time_gym_aloha(steps: int = 10) -> dict:
    import gym_aloha  # noqa: F401  (registers the environments)
    import gymnasium as gym
    import numpy as np

    env = gym.make("gym_aloha/AlohaTransferCube-v0")
    env.reset(seed=0)
    action = np.array([0, -0.96, 1.16, 0, -0.3, 0, 1.0] * 2)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(action)
    ms = (time.perf_counter() - t0) / steps * 1e3
    env.close()
    return {"config": "gym-aloha wrapper (3 x 480x640 every step)", "tick": ms, "load": 50 * ms / 1000.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=50, help="expert episodes (seeds 0..N-1), default 50")
    p.add_argument("--sizes", type=_size, nargs="+", default=[(240, 320)], help="image sizes HxW (default 240x320)")
    p.add_argument("--gym-aloha", action="store_true", help="also time the stock gym-aloha wrapper's step")
    args = p.parse_args(argv)

    print(
        f"# bench_sim  ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, python {platform.python_version()})"
    )
    print()
    print("## step + render per control tick (50 Hz physics = 10 x 2 ms substeps; cameras rendered every tick)")
    print()
    print("| configuration | step ms (mean / p95) | render ms (mean / p95) | step+render ms | real-time load |")
    print("|---|---|---|---|---|")
    rows = [time_rig((240, 320), ())] + [time_rig(s, DEFAULT_CAMERAS) for s in args.sizes]
    for r in rows:
        render = "-" if r["render"][0] == 0 else f"{r['render'][0]:.2f} / {r['render'][1]:.2f}"
        print(
            f"| {r['config']} | {r['step'][0]:.2f} / {r['step'][1]:.2f} | {render} | {r['tick']:.2f} | "
            f"{r['load']:.2f} |"
        )
    if args.gym_aloha:
        g = time_gym_aloha()
        print(f"| {g['config']} | - | - | {g['tick']:.1f} | {g['load']:.2f} |")
    print()
    print("real-time load = wall seconds per simulated second at 50 Hz physics + 30 Hz rendering (< 1: real time)")
    print()

    print(f"## scripted expert (transfer_cube, differential IK, 30 Hz joint commands), seeds 0..{args.seeds - 1}")
    print()
    t0 = time.perf_counter()
    results = evaluate_expert(range(args.seeds))
    wall = time.perf_counter() - t0
    ok = sum(r.success for r in results)
    at_end = sum(r.success_at_end for r in results)
    failed = [r.seed for r in results if not r.success]
    print(f"success (reward 4 reached): {ok}/{len(results)} = {ok / len(results):.0%}")
    print(f"still holding at the end:   {at_end}/{len(results)}")
    print(f"failed seeds: {failed or 'none'}")
    print(f"wall time: {wall:.1f} s ({wall / len(results):.2f} s per 8 s episode, physics only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
