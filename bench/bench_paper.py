"""The QVLA paper's analyses, re-measured on our trained π0 in the simulated rig: each reproduced or refuted.

    PYTHONPATH=src .venv/bin/python bench/bench_paper.py --policy models/sim_transfer_cube_fp \\
        --episodes data/demos --out runs/bench_paper

  Fig. 1a  module sensitivity: quantize ONE role at a time (per-channel RTN at 4 and 2 bits, everything else full
           precision) and measure the teacher-forced action error (Eq. 4: MSE vs FP, same noise) on held-out
           recorded observations; the paper orders vision < language < projector / action head.
  Fig. 1b  within-layer heterogeneity: per-channel action-space sensitivity at 4 bits (from the two-stage
           calibration) per layer: max / median, the share of the layer's total held by its top 10% of channels.
  Table 3  channel-wise vs layer-wise uniform RTN at INT8 / INT4: action MSE and cumulative deviation (Eq. 5).
  Table 4  pruning and uniform bits under an INT8 budget: QVLA at 8 bits with and without the 0-bit choice vs
           uniform W8.
  Fig. 3   cumulative deviation over an episode, QVLA-8 vs uniform-8 and QVLA-4 vs uniform-4, along the quantized
           policy's own closed-loop rollouts (mean over --fig3-seeds).
  Eq. 4 vs Eq. 5   rank agreement: every sampled layer alone at 2 bits; single-step teacher-forced action error
           (Eq. 4) against the cumulative deviation of short closed-loop rollouts (Eq. 5); Spearman over layers.

Quantized models are fake-quantized in place (`qvla_quant.transforms.fake_quantize_model`: the reference the
packed model matches within 1e-5 relative), so every variant runs at float speed; the closed-loop numbers of the
packed artifacts are bench_policy.py's. Results are cached per measurement under --out (results.json), so a
stopped run continues; plots are written beside it.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from bench_policy import held_out_episodes, teacher_forced_mse  # noqa: E402
from qvla_quant import AllocationConfig, CalibrationConfig, PlanTemplate, allocate  # noqa: E402
from qvla_quant.baselines import layerwise_plan, uniform_plan  # noqa: E402
from qvla_quant.transforms import fake_quantize_model  # noqa: E402
from qvla_ros.policy.evaluate import run_episode  # noqa: E402
from qvla_ros.policy.quantize import calibrate_policy, episode_observations, policy_adapter  # noqa: E402
from qvla_ros.policy.runtime import PolicyRuntime  # noqa: E402
from qvla_ros.policy.train import list_episodes  # noqa: E402

ROLES = ("vision", "projector", "language", "action", "action_head")


class Results:
    """results.json under the output directory: one entry per measurement, written as soon as it is made."""

    def __init__(self, out: Path):
        self.path = out / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            tmp = self.path.with_name("results.json.tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        return self.data[key]


def quantized_runtime(policy: Path, plan) -> PolicyRuntime:
    """The FP policy with `plan` fake-quantized into its weights (None: the FP policy itself)."""
    rt = PolicyRuntime.load(policy)
    if plan is not None:
        fake_quantize_model(rt.model, plan, inplace=True)
    return rt


def closed_loop_deviation(policy: Path, plan, seeds, steps: int) -> dict:
    """Mean Eq. 5 cumulative deviation from FP along the quantized policy's own rollouts, and the mean curve."""
    from qvla_ros.sim.rig import SimRig

    fp, q = PolicyRuntime.load(policy), quantized_runtime(policy, plan)
    curves, totals, successes = [], [], 0
    with SimRig(task="transfer_cube", image_size=(240, 320), camera_names=tuple(q.camera_names)) as rig:
        for seed in seeds:
            r = run_episode(rig, q, seed, steps=steps, reference=fp)
            curves.append(r.deviation_curve)
            totals.append(r.cumulative_deviation)
            successes += int(r.success)
    n = min(len(c) for c in curves)
    return {
        "mean": float(np.mean(totals)),
        "std": float(np.std(totals)),
        "successes": successes,
        "episodes": len(seeds),
        "curve": np.mean([c[:n] for c in curves], axis=0).tolist(),
    }


def role_layers(layers, role):
    return [x for x in layers if x.role == role]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--episodes", required=True, help="the demonstrations the policy was trained on")
    p.add_argument("--out", default="runs/bench_paper")
    p.add_argument("--calib-episodes", type=int, default=16)
    p.add_argument("--samples-per-episode", type=int, default=4)
    p.add_argument("--mse-samples-per-episode", type=int, default=16)
    p.add_argument(
        "--exact-fraction",
        type=float,
        default=CalibrationConfig.exact_fraction,
        help="of the calibration (see bench_policy)",
    )
    p.add_argument(
        "--sensitivity-store",
        help="the calibration's resumable store (default <out>/sensitivity); bench_policy's <work>/sensitivity is "
        "reused when its calibration settings are the same",
    )
    p.add_argument("--fig3-seeds", default="2000-2009", help="closed-loop seeds for Fig. 3 and Tables 3/4")
    p.add_argument("--rank-layers", type=int, default=20, help="layers sampled for the Eq. 4 / Eq. 5 agreement")
    p.add_argument("--rank-seeds", default="2100-2102")
    p.add_argument("--rank-steps", type=int, default=90, help="30 Hz ticks of each short rollout (Eq. 5)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from qvla_ros.policy.evaluate import parse_seeds

    policy, out = Path(args.policy), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    train_eps, val_eps = held_out_episodes(policy, list_episodes(args.episodes))
    calib_eps = train_eps[:: max(1, len(train_eps) // args.calib_episodes)][: args.calib_episodes]
    mse_obs = [o for _, _, o in episode_observations(val_eps, args.mse_samples_per_episode, 30, seed=1)]
    fig3_seeds, rank_seeds = parse_seeds(args.fig3_seeds), parse_seeds(args.rank_seeds)
    _, adapter = policy_adapter(policy)
    every_layer = adapter.layers()
    fp = PolicyRuntime.load(policy)
    t0 = time.time()
    print(
        f"bench_paper: {policy}; Eq. 4 on {len(mse_obs)} held-out samples of {len(val_eps)} validation episodes; "
        f"closed loop on seeds {args.fig3_seeds}; torch {torch.__version__}, {args.threads} threads",
        flush=True,
    )

    def mse_of(plan) -> float:
        return teacher_forced_mse(fp, quantized_runtime(policy, plan), mse_obs)

    # ---- Fig. 1a: one role at a time
    print("\nFig. 1a: one role quantized at a time (per-channel RTN), teacher-forced action MSE vs FP")
    print("| role | layers | weights | MSE at W4 | MSE at W2 | W2 MSE per million weights |")
    print("|---|---|---|---|---|---|")
    fig1a = {}
    for role in ROLES:
        layers = role_layers(every_layer, role)
        if not layers:
            continue
        n = sum(x.n_weights for x in layers)
        row = {
            b: results.get(f"fig1a/{role}/w{b}", lambda b=b, layers=layers: mse_of(uniform_plan(layers, b)))
            for b in (4, 2)
        }
        fig1a[role] = {"layers": len(layers), "weights": n, **{f"w{b}": v for b, v in row.items()}}
        print(f"| {role} | {len(layers)} | {n:,} | {row[4]:.3g} | {row[2]:.3g} | {row[2] / n * 1e6:.3g} |", flush=True)
    order = sorted(fig1a, key=lambda r: fig1a[r]["w2"])
    print(
        f"ordering by W2 MSE (least sensitive first): {' < '.join(order)}  (paper: vision < language < "
        "projector / action head)"
    )

    # ---- calibration (for Fig. 1b, Table 4, Fig. 3)
    store = Path(args.sensitivity_store) if args.sensitivity_store else out / "sensitivity"
    calibration = CalibrationConfig(store_dir=str(store), template=PlanTemplate(), exact_fraction=args.exact_fraction)
    sens, info = calibrate_policy(
        policy, calib_eps, samples_per_episode=args.samples_per_episode, calibration=calibration
    )
    print(f"\ncalibration: {info['samples']} samples, {info['calibration_s']:.0f} s (resumed from the store if there)")

    # ---- Fig. 1b: heterogeneity within layers
    print("\nFig. 1b: per-channel sensitivity at 4 bits within each layer")
    col = list(sens.bits).index(4)
    stats = []
    for name in sens.layers:
        s = sens.values(name)[:, col].double()
        s = s[torch.isfinite(s)]
        if s.numel() < 8 or float(s.sum()) <= 0:
            continue
        srt = torch.sort(s, descending=True).values
        top = max(1, s.numel() // 10)
        stats.append(
            {
                "layer": name,
                "role": sens.layers[name].role,
                "rows": int(s.numel()),
                "max_over_median": float(srt[0] / max(float(s.median()), 1e-30)),
                "top10_share": float(srt[:top].sum() / srt.sum()),
                "sorted": (srt / srt[0]).tolist(),
            }
        )
    shares = np.array([x["top10_share"] for x in stats])
    ratios = np.array([x["max_over_median"] for x in stats])
    print(
        f"{len(stats)} layers: top 10% of channels hold {np.median(shares):.0%} of a layer's sensitivity (median; "
        f"range {shares.min():.0%}-{shares.max():.0%}); max / median channel: median {np.median(ratios):.1f}x "
        f"(range {ratios.min():.1f}-{ratios.max():.3g}x). Uniform channels would give 10% and 1x."
    )

    # ---- Table 3 and Table 4 and Fig. 3: open loop and closed-loop deviation
    template_layers = [x for x in every_layer if x.name in sens.layers]  # what the default template quantizes
    variants = {
        "RTN W8 per-channel": uniform_plan(template_layers, 8),
        "RTN W8 layer-wise": layerwise_plan(template_layers, 8),
        "RTN W4 per-channel": uniform_plan(template_layers, 4),
        "RTN W4 layer-wise": layerwise_plan(template_layers, 4),
        "QVLA 8 (0-bit allowed)": allocate(sens, 8.0, AllocationConfig()),
        "QVLA 8 (no pruning)": allocate(sens, 8.0, AllocationConfig(bits=(2, 4, 8, 16))),
        "QVLA 4 (0-bit allowed)": allocate(sens, 4.0, AllocationConfig()),
    }
    rows = {}
    for name, plan in variants.items():
        mse = results.get(f"mse/{name}", lambda plan=plan: mse_of(plan))
        dev = results.get(
            f"closed/{name}/{args.fig3_seeds}", lambda plan=plan: closed_loop_deviation(policy, plan, fig3_seeds, 240)
        )
        rows[name] = {"mse": mse, "avg_bits": plan.average_bits(), "pruned": plan.pruned_fraction(), **dev}
    print(
        f"\nTables 3 and 4: teacher-forced MSE and Eq. 5 deviation along {len(fig3_seeds)} closed-loop rollouts "
        "(8 s each; success here is a side count, the paired 100-seed success is bench_policy.py's)"
    )
    print("| variant | avg bits | pruned | action MSE vs FP | cum. deviation (mean +- sd) | successes |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['avg_bits']:.2f} | {r['pruned']:.1%} | {r['mse']:.3g} | {r['mean']:.2f} +- "
            f"{r['std']:.2f} | {r['successes']}/{r['episodes']} |"
        )

    # ---- Eq. 4 vs Eq. 5 rank agreement
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(template_layers), size=min(args.rank_layers, len(template_layers)), replace=False))
    eq4, eq5 = [], []
    for i in pick:
        layer = template_layers[i]
        plan = uniform_plan([layer], 2)
        eq4.append(results.get(f"rank/eq4/{layer.name}", lambda plan=plan: mse_of(plan)))
        eq5.append(
            results.get(
                f"rank/eq5/{layer.name}/{args.rank_seeds}/{args.rank_steps}",
                lambda plan=plan: closed_loop_deviation(policy, plan, rank_seeds, args.rank_steps)["mean"],
            )
        )
    rho = spearmanr(eq4, eq5).statistic if len(pick) > 2 else float("nan")
    print(
        f"\nEq. 4 vs Eq. 5: {len(pick)} layers, each alone at 2 bits: Spearman rank correlation of the single-step "
        f"teacher-forced error and the cumulative closed-loop deviation ({len(rank_seeds)} rollouts of "
        f"{args.rank_steps} ticks): rho = {rho:.3f}"
    )

    summary = {
        "fig1a": fig1a,
        "fig1a_order": order,
        "fig1b": [{k: v for k, v in x.items() if k != "sorted"} for x in stats],
        "tables": rows,
        "rank": {"layers": [template_layers[i].name for i in pick], "eq4": eq4, "eq5": eq5, "spearman": rho},
        "wall_s": time.time() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(out, fig1a, stats, rows, eq4, eq5, rho)
    print(f"\nplots and summary.json in {out} ({time.time() - t0:.0f} s)")
    return 0


def plot(out: Path, fig1a, stats, rows, eq4, eq5, rho) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    roles = list(fig1a)
    x = np.arange(len(roles))
    for k, b in enumerate((4, 2)):
        ax[0].bar(x + 0.4 * k - 0.2, [fig1a[r][f"w{b}"] for r in roles], 0.4, label=f"W{b}")
    ax[0].set_xticks(x, roles)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("teacher-forced action MSE vs FP")
    ax[0].set_title("Fig. 1a: one role quantized at a time")
    ax[0].legend()
    for st in sorted(stats, key=lambda s: -s["max_over_median"])[:6]:
        ax[1].plot(np.linspace(0, 1, len(st["sorted"])), st["sorted"], label=f"{st['layer'][-38:]}")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("channel rank (fraction of the layer)")
    ax[1].set_ylabel("sensitivity / the layer's max (4 bits)")
    ax[1].set_title("Fig. 1b: within-layer heterogeneity")
    ax[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "fig1_sensitivity.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("RTN W8 per-channel", "QVLA 8 (0-bit allowed)", "RTN W4 per-channel", "QVLA 4 (0-bit allowed)"):
        curve = rows[name]["curve"]
        ax[0].plot(np.arange(1, len(curve) + 1) / 3.0, curve, label=name)  # a prediction every 10 ticks = 1/3 s
    ax[0].set_xlabel("time in the episode (s)")
    ax[0].set_ylabel("cumulative action deviation from FP (Eq. 5)")
    ax[0].set_title("Fig. 3: error accumulation")
    ax[0].legend(fontsize=8)
    ax[1].scatter(eq4, eq5)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("Eq. 4: single-step teacher-forced error")
    ax[1].set_ylabel("Eq. 5: cumulative closed-loop deviation")
    ax[1].set_title(f"one layer at 2 bits: Spearman {rho:.2f}")
    fig.tight_layout()
    fig.savefig(out / "fig3_accumulation_and_rank.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
