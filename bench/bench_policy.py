"""QVLA vs uniform RTN on our trained π0 policy in the simulated rig: the project's version of the paper's tables.

    PYTHONPATH=src .venv/bin/python bench/bench_policy.py --policy models/sim_transfer_cube_fp \\
        --episodes data/demos --seeds 1000-1049 --budgets 8,4,3 --json runs/bench_policy.json

For the full-precision policy and each quantized one (QVLA = two-stage action-space sensitivity + allocation at
average budgets 8/4/3 bits per weight, with the paper's greedy solver and with the Lagrangian solver; uniform
per-channel RTN at W8 and W4 on the same layers), it prints:
  - closed-loop success over the seeded held-out episodes (seeds never used for the demonstrations: demos use 0..),
  - mean cumulative action deviation from the FP policy along the quantized policy's own rollouts (Eq. 5, whole
    chunks at each prediction, joint units),
  - teacher-forced action MSE vs FP on held-out recorded observations (the validation episodes of training),
  - average bits, pruned fraction, weights as stored, and calibration / evaluation time.
Every quantized policy is written as a real packed artifact and loaded back through PolicyRuntime, exactly as the
robot would; the evaluation runs it with the dequantized-weight cache on (same outputs, float speed on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from qvla_ros.policy.evaluate import evaluate, parse_seeds  # noqa: E402
from qvla_ros.policy.quantize import calibrate_policy, episode_observations, write_quantized_policy  # noqa: E402
from qvla_ros.policy.runtime import PolicyRuntime  # noqa: E402
from qvla_ros.policy.train import list_episodes, validation_split  # noqa: E402


def held_out_episodes(policy_dir: Path, episodes: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training episodes, held-out episodes) as the policy's training run split them."""
    info = json.loads((policy_dir / "train_config.json").read_text())
    cfg = info["train_config"]
    val = set(validation_split(len(episodes), cfg["val_episodes"], cfg["data_seed"]))
    return [p for i, p in enumerate(episodes) if i not in val], [p for i, p in enumerate(episodes) if i in val]


def teacher_forced_mse(fp: PolicyRuntime, q: PolicyRuntime, observations, batch_size: int = 8) -> float:
    """Mean squared action error (joint units) of q vs fp on recorded observations, same fixed noise."""
    errs = []
    for i in range(0, len(observations), batch_size):
        obs = observations[i:i + batch_size]
        a = fp.processor.actions_from_model(fp.sample_model_actions(fp.model_inputs(obs)))
        b = q.processor.actions_from_model(q.sample_model_actions(q.model_inputs(obs)))
        errs.append(((a - b) ** 2).reshape(len(obs), -1).mean(1))
    return float(np.concatenate(errs).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="full-precision policy directory")
    p.add_argument("--episodes", required=True, help="the demonstrations the policy was trained on")
    p.add_argument("--seeds", default="1000-1049")
    p.add_argument("--budgets", default="8,4,3")
    p.add_argument("--solvers", default="greedy,lagrangian")
    p.add_argument("--rtn", default="8,4", help="uniform per-channel RTN bit-widths")
    p.add_argument("--calib-episodes", type=int, default=16)
    p.add_argument("--samples-per-episode", type=int, default=4)
    p.add_argument("--mse-samples-per-episode", type=int, default=16)
    p.add_argument("--work", default="runs/bench_policy", help="where the artifacts are written")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from qvla_quant import AllocationConfig, allocate
    from qvla_quant.baselines import uniform_plan

    policy = Path(args.policy)
    seeds = parse_seeds(args.seeds)
    work = Path(args.work)
    train_eps, val_eps = held_out_episodes(policy, list_episodes(args.episodes))
    calib_eps = train_eps[:: max(1, len(train_eps) // args.calib_episodes)][: args.calib_episodes]
    mse_obs = [o for _, _, o in episode_observations(val_eps, args.mse_samples_per_episode, 30, seed=1)]
    print(f"bench_policy: {policy}; {len(seeds)} closed-loop episodes (seeds {args.seeds}); calibration on "
          f"{len(calib_eps)} training episodes x {args.samples_per_episode} samples; action MSE on {len(mse_obs)} "
          f"held-out samples of {len(val_eps)} validation episodes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    fp = PolicyRuntime.load(policy)
    rows = []
    t0 = time.time()
    fp_report = evaluate(fp, seeds, progress=False, policy_name="fp")
    fp_status = fp.quantization_status()
    rows.append({"method": "FP (fp32)", "budget": None, "avg_bits": 32.0, "pruned": 0.0,
                 "weight_bytes": fp_status["weight_bytes"], "success": fp_report.success_rate,
                 "successes": fp_report.summary()["successes"], "cum_dev": 0.0, "mse": 0.0,
                 "eval_s": time.time() - t0, "latency_ms": fp_report.summary()["mean_latency_ms"]})
    print(f"FP: success {fp_report.success_rate:.0%} ({time.time() - t0:.0f} s)", flush=True)

    t0 = time.time()
    sens, info = calibrate_policy(policy, calib_eps, samples_per_episode=args.samples_per_episode,
                                  store_dir=work / "sensitivity")
    calib_s = time.time() - t0
    print(f"calibration: {calib_s:.0f} s ({info['samples']} samples)", flush=True)

    plans = []
    for solver in [s for s in args.solvers.split(",") if s]:
        for b in [float(x) for x in args.budgets.split(",") if x]:
            plans.append((f"QVLA-{solver}", b, allocate(sens, b, AllocationConfig(solver=solver))))
    template = plans[0][2]
    for b in [int(x) for x in args.rtn.split(",") if x]:
        plans.append((f"RTN W{b} per-channel", float(b), uniform_plan(template, b)))

    for name, budget, plan in plans:
        t0 = time.time()
        out = work / f"{name.replace(' ', '_')}_{budget:g}"
        write_quantized_policy(policy, plan, out, plots_of=sens if name.startswith("QVLA") else None)
        q = PolicyRuntime.load(out, cache_dequantized=True)
        status = q.quantization_status()
        mse = teacher_forced_mse(fp, q, mse_obs)
        report = evaluate(q, seeds, reference=fp, progress=False, policy_name=name)
        s = report.summary()
        rows.append({"method": name, "budget": budget, "avg_bits": plan.average_bits(),
                     "pruned": plan.pruned_fraction(), "weight_bytes": status["weight_bytes"],
                     "success": report.success_rate, "successes": s["successes"],
                     "cum_dev": s["mean_cumulative_deviation"], "mse": mse, "eval_s": time.time() - t0,
                     "latency_ms": s["mean_latency_ms"]})
        print(f"{name} @ {budget:g}: success {report.success_rate:.0%}, MSE {mse:.3g} ({time.time() - t0:.0f} s)",
              flush=True)

    n = len(seeds)
    print()
    print(f"| method | budget | avg bits | pruned | weights (KiB) | success ({n} seeds) | cum. deviation (Eq. 5) "
          f"| action MSE vs FP |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        print(f"| {r['method']} | {budget} | {r['avg_bits']:.2f} | {r['pruned']:.1%} | {r['weight_bytes'] / 1024:.0f} "
              f"| {r['successes']}/{n} = {r['success']:.0%} | {r['cum_dev']:.3f} | {r['mse']:.3g} |")
    print(f"\ncalibration (two-stage sensitivity, {info['samples']} samples): {calib_s:.0f} s; "
          f"weights = all parameters as stored (quantized layers packed, the rest fp32)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "calibration_s": calib_s, "seeds": seeds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
