"""Calibration time per stage of the committed policy on recorded episodes: the job the calibration node runs
(qvla_ros.policy.calibration_job), in this process.

    PYTHONPATH=src .venv/bin/python bench/bench_calibration.py --episodes runs/calibration-demo-*/demos
    PYTHONPATH=src .venv/bin/python bench/bench_calibration.py --record 3          # records 3 scripted demos first

Prints each stage's wall time (reading, sampling, proxy, exact, allocating, packing, validating), the share of the
whole, the sample counts and settings used, and what came out (average bits, validation error vs full precision).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=str(ROOT / "models" / "sim_transfer_cube_fp"))
    ap.add_argument("--episodes", nargs="*", default=[], help="episode or dataset directories")
    ap.add_argument("--record", type=int, default=0, help="record this many scripted demos first (qvla-sim)")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--solver", default="greedy", choices=("greedy", "lagrangian"))
    ap.add_argument("--samples-per-episode", type=int, default=2)
    ap.add_argument("--validation-episodes", type=int, default=1)
    ap.add_argument("--validation-samples", type=int, default=8)
    ap.add_argument("--exact-fraction", type=float, default=0.01)
    ap.add_argument("--rank-sample", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="artifact directory (default: temporary)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from qvla_ros.policy.calibration_job import STAGES, JobSpec, run_job

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="qvla_bench_calibration_")
    episodes = list(args.episodes)
    if args.record:
        demos = Path(tmp.name) / "demos"
        t0 = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qvla_ros.sim.cli",
                "record-demos",
                "--out",
                str(demos),
                "-n",
                str(args.record),
                "--seed0",
                "2000",
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        print(f"recorded {args.record} demos in {time.monotonic() - t0:.0f} s", flush=True)
        episodes.append(str(demos))
    if not episodes:
        print("bench_calibration: error: give --episodes DIR or --record N", file=sys.stderr)
        return 2
    out = args.out or str(Path(tmp.name) / "artifact")
    spec = JobSpec(
        policy=args.policy,
        recordings=episodes,
        out=out,
        budget=args.budget,
        solver=args.solver,
        samples_per_episode=args.samples_per_episode,
        validation_episodes=args.validation_episodes,
        validation_samples_per_episode=args.validation_samples,
        exact_fraction=args.exact_fraction,
        rank_sample=args.rank_sample,
    )
    t0 = time.monotonic()
    last = {}

    def emit(e):
        if e["event"] == "progress" and e["stage"] != last.get("stage"):
            last["stage"] = e["stage"]
            print(f"  {e['stage']} ...", flush=True)

    result = run_job(spec, emit)
    total = time.monotonic() - t0
    times = result["stage_times_s"]
    print(
        f"\ncalibration of {Path(args.policy).name} on {result['calibration_samples']} samples from "
        f"{len(result['calibration_episodes'])} episode(s), {result['validation']['samples']} held-out samples; "
        f"budget {args.budget:g}, {args.solver}, exact_fraction {args.exact_fraction}, rank_sample "
        f"{args.rank_sample}, {args.threads} torch thread(s)"
    )
    print(f"{'stage':<12} {'seconds':>8} {'share':>6}")
    for s in STAGES:
        if s in times:
            print(f"{s:<12} {times[s]:>8.1f} {100 * times[s] / total:>5.1f}%")
    print(f"{'total':<12} {total:>8.1f}")
    print(
        f"-> {result['average_bits']:.3f} bits/weight ({result['average_bits_with_overhead']:.3f} with scale/zero), "
        f"pruned {100 * result['pruned_fraction']:.1f}%; {result['validation_text']}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "stage_times_s": times,
                    "total_s": total,
                    "result": {
                        k: result[k]
                        for k in (
                            "average_bits",
                            "average_bits_with_overhead",
                            "pruned_fraction",
                            "action_mse",
                            "calibration_samples",
                        )
                    },
                },
                indent=1,
            )
        )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
