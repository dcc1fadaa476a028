"""Cumulative action deviation over an episode, QVLA vs uniform RTN at the same average bits (the paper's Fig. 3).

    PYTHONPATH=src .venv/bin/python bench/bench_monitor.py                      # 3 seeds, W4, ~5 min on 2 cores
    PYTHONPATH=src .venv/bin/python bench/bench_monitor.py --seeds 1000-1009 --out runs/fig3.png

Per-step action errors compound over an episode: for the committed QVLA W4 artifact (models/sim_transfer_cube_w4)
and for uniform per-channel RTN W4 of the same float policy (made here, on the same layers, as bench_policy.py does),
each runs closed loop in the MuJoCo sim on the same held-out seeds while the full-precision policy predicts on the
very same observations; the deviation after each prediction is ||A - A*||_2 over the whole chunk (Eq. 4), summed
over the episode (Eq. 5). That is what qvla-eval computes (qvla_ros.policy.evaluate, reused here) and what the
monitor node publishes live as ActionDeviation.cumulative_l2_total. Prints a table (final cumulative deviation per
seed, mean, the RTN / QVLA ratio, and the curve at a few times) and writes the figure (PNG) and a JSON of the curves.
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

from qvla_quant.artifact import artifact_summary  # noqa: E402
from qvla_ros.policy.evaluate import evaluate, parse_seeds  # noqa: E402
from qvla_ros.policy.runtime import PolicyRuntime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"QVLA": "tab:blue", "RTN": "tab:red"}


def make_rtn(policy: Path, template_artifact: Path, bits: int, out: Path) -> Path:
    """Uniform per-channel RTN at `bits` on the layers (and source fingerprint) of the QVLA artifact's plan."""
    from qvla_quant.artifact import read_plan
    from qvla_quant.baselines import uniform_plan
    from qvla_ros.policy.quantize import write_quantized_policy

    plan = uniform_plan(read_plan(template_artifact), bits)
    return write_quantized_policy(policy, plan, out)


def average_bits(artifact: Path) -> float:
    return float(artifact_summary(artifact)["average_bits"])


def plot(curves: dict[str, list[list[float]]], period: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, runs in curves.items():
        colour = next((c for k, c in COLOURS.items() if name.startswith(k)), None)
        n = min(len(r) for r in runs)
        for r in runs:
            ax.plot(np.arange(1, len(r) + 1) * period, r, color=colour, alpha=0.3, lw=0.8)
        mean = np.mean([r[:n] for r in runs], axis=0)
        ax.plot(np.arange(1, n + 1) * period, mean, color=colour, lw=2.2, label=f"{name} (mean of {len(runs)})")
    ax.set_xlabel("episode time (s)")
    ax.set_ylabel("cumulative action deviation  Σ‖A − A*‖₂ (Eq. 5)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default=str(REPO / "models" / "sim_transfer_cube_fp"), help="full-precision policy")
    p.add_argument("--qvla", default=str(REPO / "models" / "sim_transfer_cube_w4"), help="QVLA artifact")
    p.add_argument("--rtn-bits", type=int, default=4, help="uniform RTN bit-width (the QVLA artifact's budget)")
    p.add_argument("--seeds", default="1000-1002", help='held-out sim seeds, e.g. "1000-1009" (default: 3)')
    p.add_argument("--steps", type=int, default=240, help="30 Hz command ticks per episode (240 = 8 s)")
    p.add_argument("--replan-every", type=int, default=10, help="command ticks between predictions")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_monitor"), help="where the RTN artifact goes")
    p.add_argument("--out", default=None, help="figure path (default: <work>/fig3_cumulative_deviation.png)")
    p.add_argument("--json", default=None, help="curves as JSON (default: <work>/fig3_curves.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy, qvla, work = Path(args.policy), Path(args.qvla), Path(args.work)
    out = Path(args.out) if args.out else work / "fig3_cumulative_deviation.png"
    seeds = parse_seeds(args.seeds)
    t0 = time.time()
    rtn = make_rtn(policy, qvla, args.rtn_bits, work / f"rtn_w{args.rtn_bits}")
    print(
        f"bench_monitor: reference {policy.name}; QVLA {qvla.name} ({average_bits(qvla):.2f} avg bits) vs uniform "
        f"per-channel RTN W{args.rtn_bits} ({average_bits(rtn):.2f} avg bits, made in {time.time() - t0:.0f} s); "
        f"seeds {args.seeds}, {args.steps} ticks, a prediction every {args.replan_every}; torch "
        f"{torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    reference = PolicyRuntime.load(policy)
    methods = {f"QVLA W{average_bits(qvla):g}": qvla, f"RTN W{args.rtn_bits}": rtn}
    results = {}
    for name, path in methods.items():
        t = time.time()
        runtime = PolicyRuntime.load(path, cache_dequantized=True)  # same outputs, float speed on this CPU
        report = evaluate(
            runtime,
            seeds,
            reference=reference,
            steps=args.steps,
            replan_every=args.replan_every,
            progress=False,
            policy_name=path.name,
            reference_name=policy.name,
        )
        results[name] = report
        print(
            f"{name}: {time.time() - t:.0f} s; mean cumulative deviation "
            f"{report.summary()['mean_cumulative_deviation']:.3f}",
            flush=True,
        )

    period = args.replan_every / 30.0
    curves = {n: [e.deviation_curve for e in r.episodes] for n, r in results.items()}
    names = list(results)
    print()
    print("| seed | " + " | ".join(f"{n}: cum. deviation (success)" for n in names) + " | RTN / QVLA |")
    print("|---|" + "---|" * len(names) + "---|")
    for i, s in enumerate(seeds):
        eps = [results[n].episodes[i] for n in names]
        ratio = eps[1].cumulative_deviation / max(eps[0].cumulative_deviation, 1e-12)
        print(
            f"| {s} | "
            + " | ".join(f"{e.cumulative_deviation:.3f} ({'yes' if e.success else 'no'})" for e in eps)
            + f" | {ratio:.2f} |"
        )
    means = [float(np.mean([e.cumulative_deviation for e in results[n].episodes])) for n in names]
    stds = [float(np.std([e.cumulative_deviation for e in results[n].episodes])) for n in names]
    print(
        "| mean ± std | "
        + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in zip(means, stds))
        + f" | {means[1] / max(means[0], 1e-12):.2f} |"
    )
    n = min(len(c) for runs in curves.values() for c in runs)
    marks = sorted({max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), n})
    print("\nmean cumulative deviation at episode time (s): " + ", ".join(f"{k * period:.1f}" for k in marks))
    for name in names:
        mean = np.mean([c[:n] for c in curves[name]], axis=0)
        print(f"  {name:<10} " + "  ".join(f"{mean[k - 1]:7.3f}" for k in marks))
    plot(curves, period, out, f"cumulative deviation from FP along each policy's rollout, seeds {args.seeds}")
    js = Path(args.json) if args.json else work / "fig3_curves.json"
    js.write_text(
        json.dumps(
            {
                "seeds": seeds,
                "period_s": period,
                "curves": curves,
                "episodes": {n: [e.__dict__ for e in r.episodes] for n, r in results.items()},
            },
            indent=1,
        )
    )
    print(f"\nfigure: {out}\ncurves: {js}\nwall time {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
