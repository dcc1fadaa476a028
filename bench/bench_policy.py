"""QVLA vs uniform RTN (and the LLM baselines) on our trained π0 in the simulated rig, closed loop, paired by seed.

    PYTHONPATH=src .venv/bin/python bench/bench_policy.py --policy models/sim_transfer_cube_fp \\
        --episodes data/demos --seeds 1000-1099 --json runs/bench_policy.json

Resumable: every finished episode is appended to `<work>/episodes/<row>.jsonl` (keyed by the artifact's plan hash,
the policy's weights and the evaluation settings), the sensitivities to `<work>/sensitivity`, the teacher-forced
MSE to `<work>/mse`; a stopped run continues where it was, a finished one only prints (and plots) again.
Statistics (`qvla_ros.policy.stats`): each row's successes with a Wilson 95% interval, and an exact McNemar test of
the row against FP and against uniform per-channel RTN at the same average bits, on the same seeds.

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

--baselines adds the LLM-derived baselines (`qvla_quant.llm_baselines`), calibrated on the same samples as QVLA and
written as artifacts the same way: e.g. `--baselines awq:4,gptq:4,gptq:4g64,gptq:3,smoothquant:8,module` (method:bits,
"g64" = GPTQ with one scale/zero per 64 columns, "module" = vision 4 bits, language model and action expert 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from qvla_quant import AllocationConfig, CalibrationConfig, PlanTemplate, allocate  # noqa: E402
from qvla_quant.artifact import artifact_summary, read_plan  # noqa: E402
from qvla_quant.baselines import layerwise_plan, uniform_plan  # noqa: E402
from qvla_quant.bits import KEEP_BITS  # noqa: E402
from qvla_quant.files import file_sha256, is_artifact  # noqa: E402
from qvla_quant.roles import DEFAULT_ROLE_RULES, ROLES  # noqa: E402
from qvla_ros.policy.episode_cache import EpisodeCache, row_key  # noqa: E402
from qvla_ros.policy.evaluate import evaluate, parse_seeds  # noqa: E402
from qvla_ros.policy.quantize import calibrate_policy, episode_observations, write_quantized_policy  # noqa: E402
from qvla_ros.policy.runtime import PolicyRuntime  # noqa: E402
from qvla_ros.policy.stats import compare_paired, wilson_interval  # noqa: E402
from qvla_ros.policy.train import list_episodes  # noqa: E402


def held_out_episodes(policy_dir: Path, episodes: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training episodes, held-out episodes) as the policy's training run split them, by episode name: a directory
    holding more demonstrations than the policy saw (e.g. 300 where it trained on 200) must not move the split, and
    episodes it never saw are neither calibration nor held-out samples."""
    info = json.loads((policy_dir / "train_config.json").read_text())
    if "episodes" not in info or "val_episodes" not in info:
        raise SystemExit(f"bench_policy: {policy_dir}/train_config.json lists no training / validation episodes")
    trained, val = set(info["episodes"]), set(info["val_episodes"])
    by_name = {p.name: p for p in episodes}
    missing = sorted((trained | val) - set(by_name))
    if missing:
        raise SystemExit(
            f"bench_policy: {len(missing)} of the policy's training episodes are not in the episodes directory "
            f"(e.g. {missing[0]}); record them (qvla-sim record-demos) or pass the directory it was trained on"
        )
    return [by_name[n] for n in sorted(trained - val)], [by_name[n] for n in sorted(val)]


BASELINE_NAMES = {"rtn": "RTN", "awq": "AWQ", "gptq": "GPTQ", "smoothquant": "SmoothQuant", "module": "module-wise"}


def parse_baselines(text: str) -> list[tuple[str, int | None, int | None]]:
    """ "awq:4,gptq:4g64,module" -> [(method, bits, group_size)]."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        method, _, spec = item.partition(":")
        if method not in BASELINE_NAMES:
            raise SystemExit(
                f"bench_policy: unknown baseline {method!r} in --baselines (known: {sorted(BASELINE_NAMES)})"
            )
        bits, _, group = spec.partition("g")
        try:
            out.append((method, int(bits) if bits else None, int(group) if group else None))
        except ValueError:
            raise SystemExit(f"bench_policy: --baselines entry {item!r} is not method:bits[gGROUP]") from None
    return out


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """ "noprune,rel0.1,cap0.1" -> [(label, AllocationConfig options)]: QVLA rows beside the default allocation, on
    the same sensitivities (probes of what the allocation does to closed-loop success)."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        try:
            if item == "noprune":
                out.append((item, {"bits": (2, 4, 8, 16)}))
            elif item.startswith("rel"):
                out.append((item, {"prune_rel_threshold": float(item[3:])}))
            elif item.startswith("cap"):
                out.append((item, {"max_pruned_fraction": float(item[3:])}))
            elif item.startswith("only") and item[4:] in ROLES:
                out.append((item, {"only_role": item[4:]}))
            else:
                raise ValueError
        except ValueError:
            raise SystemExit(
                f"bench_policy: --variants entry {item!r} is not noprune, relF (dual-threshold guard: prune only "
                "below F x the layer's median s(0)), capF (at most F of a layer's rows pruned) or onlyROLE (the "
                f"default plan's rows of one role, the rest at 16 bits; roles: {', '.join(ROLES)})"
            ) from None
    return out


def only_role(plan, role: str):
    """`plan` with every layer outside `role` at 16 bits: which role's quantization costs closed-loop success."""
    layers = {
        name: lp if lp.role == role else dataclasses.replace(lp, bits=[KEEP_BITS] * lp.out_features, grouped=None,
                                                             group_size=None, granularity="row")
        for name, lp in plan.layers.items()
    }  # fmt: skip
    return dataclasses.replace(plan, layers=layers, method=f"{plan.method}, only {role} quantized")


def write_baseline_policy(policy: Path, method: str, bits, group_size, calib_eps, samples_per_episode: int, out: Path):
    """A baseline artifact of the policy (+ its processor files, so that PolicyRuntime loads it); returns its plan."""
    import shutil

    from qvla_quant.llm_baselines import run_baseline
    from qvla_ros.policy.processor import PROCESSOR_FILE, TOKENIZER_FILE
    from qvla_ros.policy.quantize import calibration_batches, policy_adapter

    processor, adapter = policy_adapter(policy)
    data = calibration_batches(calib_eps, processor, samples_per_episode)  # the samples calibrate_policy draws
    kwargs = {"group_size": group_size} if group_size else {}
    res = run_baseline(method, adapter, data.batches, bits=bits, **kwargs)
    res.save(out, extra={"policy_source": str(policy), "calibration": {"samples": len(data.sources)}})
    for name in (PROCESSOR_FILE, TOKENIZER_FILE):
        shutil.copy2(policy / name, out / name)
    return res.plan


def teacher_forced_mse(fp: PolicyRuntime, q: PolicyRuntime, observations, batch_size: int = 8) -> float:
    """Mean squared action error (joint units) of q vs fp on recorded observations, same fixed noise."""
    errs = []
    for i in range(0, len(observations), batch_size):
        obs = observations[i : i + batch_size]
        a = fp.processor.actions_from_model(fp.sample_model_actions(fp.model_inputs(obs)))
        b = q.processor.actions_from_model(q.sample_model_actions(q.model_inputs(obs)))
        errs.append(((a - b) ** 2).reshape(len(obs), -1).mean(1))
    return float(np.concatenate(errs).mean())


def row_identity(policy: Path, artifact: Path, seeds_settings: dict) -> dict:
    """Everything that determines a row's episodes: the weights it runs and how it is evaluated."""
    if artifact == policy:
        weights = file_sha256(policy / "model.safetensors")
    else:
        summary = artifact_summary(artifact)
        weights = f"{summary['plan_hash']}:{summary['source_fingerprint'].get('weights')}"
    return {"weights": weights, **seeds_settings}


def evaluate_artifact(
    policy: Path, artifact: Path, name: str, seeds: list[int], mse_obs, threads: int, work: Path, **eval_kwargs
) -> dict:
    """Success per seed, Eq. 5 deviation and teacher-forced MSE of one artifact (or the FP policy) vs the FP policy;
    episodes and the MSE come from the caches under `work` when there."""
    torch.set_num_threads(threads)
    t0 = time.time()
    identity = row_identity(policy, artifact, {"task": "transfer_cube", "steps": 240, **eval_kwargs})
    key = row_key(name, identity)
    cache = EpisodeCache(work / "episodes", key)
    mse_file = work / "mse" / f"{key}.json"
    fp = PolicyRuntime.load(policy)
    if artifact == policy:  # the reference row: its deviation and MSE are 0 by definition, nothing to run twice
        q, mse, reference = fp, 0.0, None
    else:
        q = PolicyRuntime.load(artifact, cache_dequantized=True)
        reference = fp
        if mse_file.is_file():
            mse = float(json.loads(mse_file.read_text())["mse"])
        else:
            mse = teacher_forced_mse(fp, q, mse_obs)
            mse_file.parent.mkdir(parents=True, exist_ok=True)
            mse_file.write_text(json.dumps({"mse": mse, "samples": len(mse_obs)}))
    cached = len(cache.episodes(seeds))
    report = evaluate(
        q, seeds, reference=reference, progress=False, policy_name=artifact.name, cache=cache, **eval_kwargs
    )
    s = report.summary()
    return {
        "success": report.success_rate,
        "successes": s["successes"],
        "outcomes": {str(e.seed): bool(e.success) for e in report.episodes},
        "cum_dev": s["mean_cumulative_deviation"] if reference is not None else 0.0,
        "mse": mse,
        "eval_s": time.time() - t0,
        "episodes_from_cache": cached,
        "weight_bytes": q.quantization_status()["weight_bytes"],
    }


def rtn_partner(row: dict, rows: list[dict]) -> dict | None:
    """The uniform per-channel RTN row at the same average bits as `row` (none for fractional budgets)."""
    if row["budget"] is None or row["method"].startswith("RTN W"):
        return None
    for r in rows:
        if r["method"] == f"RTN W{row['budget']:g} per-channel":
            return r
    return None


def add_statistics(rows: list[dict]) -> None:
    """Wilson intervals and paired McNemar p-values (against FP and against RTN at the same bits), in place."""
    fp = rows[0]
    for r in rows:
        n = len(r["outcomes"])
        r["ci"] = wilson_interval(r["successes"], n)
        outcomes = {int(k): v for k, v in r["outcomes"].items()}
        if r is not fp:
            cmp = compare_paired(outcomes, {int(k): v for k, v in fp["outcomes"].items()})
            r["vs_fp"] = {"p": cmp.p_value, "won": cmp.a_only, "lost": cmp.b_only}
        partner = rtn_partner(r, rows)
        if partner is not None:
            cmp = compare_paired(outcomes, {int(k): v for k, v in partner["outcomes"].items()})
            r["vs_rtn"] = {"p": cmp.p_value, "won": cmp.a_only, "lost": cmp.b_only, "rtn": partner["method"]}


def plot_success(rows: list[dict], path: Path, n: int) -> None:
    """Success (Wilson 95% bars) against average stored bits per weight, one series per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows[1:]:
        family = r["method"].split(" W")[0] if " W" in r["method"] else r["method"]
        families.setdefault(family, []).append(r)
    for family, rs in families.items():
        rs = sorted(rs, key=lambda r: r["avg_bits"])
        x = [r["avg_bits"] + r["overhead_bits"] for r in rs]
        y = [r["success"] for r in rs]
        err = [[r["success"] - r["ci"][0] for r in rs], [r["ci"][1] - r["success"] for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family)
    fp = rows[0]
    ax.axhspan(fp["ci"][0], fp["ci"][1], color="gray", alpha=0.2, label=f"FP (fp32) {fp['success']:.0%}")
    ax.set_xlabel("stored bits per weight (plan average + per-row overhead)")
    ax.set_ylabel(f"closed-loop success ({n} seeds, Wilson 95%)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _p(cell: dict | None) -> str:
    if not cell:
        return "-"
    return f"{cell['p']:.3g} (+{cell['won']}/-{cell['lost']})"


def write_policy_once(policy: Path, plan, out: Path, **kwargs) -> None:
    """`write_quantized_policy` unless `out` already holds this plan's artifact (a resumed run)."""
    if is_artifact(out):
        try:
            if artifact_summary(out)["plan_hash"] == plan.hash():
                return
        except (ValueError, OSError):
            pass
    write_quantized_policy(policy, plan, out, **kwargs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="full-precision policy directory")
    p.add_argument("--episodes", required=True, help="the demonstrations the policy was trained on")
    p.add_argument("--seeds", default="1000-1099")
    p.add_argument("--budgets", default="8,4,3,2.5")
    p.add_argument("--solvers", default="greedy,lagrangian")
    p.add_argument(
        "--variants",
        default="",
        help="more QVLA rows per solver and budget on the same sensitivities: noprune (bits 2,4,8,16), relF (prune "
        "only rows below F x their layer's median s(0)), capF (at most F of a layer's rows pruned), onlyROLE (the "
        "default plan's rows of ROLE, every other layer at 16 bits: which role costs success)",
    )
    p.add_argument("--rtn", default="8,4,3,2", help="uniform per-channel RTN bit-widths")
    p.add_argument("--layerwise", default="8,4", help="uniform layer-wise RTN bit-widths (one scale per tensor)")
    p.add_argument("--baselines", default="", help="LLM-derived baselines, e.g. awq:4,gptq:4,smoothquant:8,module")
    p.add_argument(
        "--quantize-all",
        action="store_true",
        help="also quantize the projector and action head (the paper keeps them in 16 bits: default)",
    )
    p.add_argument("--calib-episodes", type=int, default=16)
    p.add_argument("--samples-per-episode", type=int, default=4)
    p.add_argument(
        "--exact-fraction",
        type=float,
        default=0.05,
        help="fraction of channel-bits whose sensitivity is re-measured exactly (the slow part)",
    )
    p.add_argument("--mse-samples-per-episode", type=int, default=16)
    p.add_argument(
        "--objective-steps",
        type=int,
        help="calibrate on the chunk's first N actions only (N = --replan-every: the executed ones); default: all",
    )
    p.add_argument("--work", default="runs/bench_policy", help="artifacts and the resumable caches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--replan-every", type=int, default=10, help="30 Hz ticks between predictions")
    p.add_argument("--blending", default="latest", help="chunk blending (see qvla-eval)")
    p.add_argument("--jobs", type=int, default=2, help="artifacts evaluated in parallel (one process each)")
    p.add_argument("--json", help="write all results (per-seed outcomes included) here")
    p.add_argument("--plot", help="success vs bits PNG (default <work>/success_vs_bits.png)")
    p.add_argument("--eval-artifact", help=argparse.SUPPRESS)  # internal: evaluate one artifact, print JSON
    p.add_argument("--eval-name", help=argparse.SUPPRESS)
    args = p.parse_args()
    baselines = parse_baselines(args.baselines)  # bad entries fail before the long calibration
    variants = parse_variants(args.variants)
    torch.set_num_threads(args.threads)

    policy = Path(args.policy)
    seeds = parse_seeds(args.seeds)
    work = Path(args.work)
    train_eps, val_eps = held_out_episodes(policy, list_episodes(args.episodes))
    calib_eps = train_eps[:: max(1, len(train_eps) // args.calib_episodes)][: args.calib_episodes]
    mse_obs = [o for _, _, o in episode_observations(val_eps, args.mse_samples_per_episode, 30, seed=1)]
    eval_kwargs = {"replan_every": args.replan_every, "blending": args.blending}
    if args.eval_artifact:
        print(
            json.dumps(
                evaluate_artifact(
                    policy, Path(args.eval_artifact), args.eval_name, seeds, mse_obs, args.threads, work, **eval_kwargs
                )
            )
        )
        return 0
    print(
        f"bench_policy: {policy}; {len(seeds)} closed-loop episodes per row (seeds {args.seeds}, paired); "
        f"calibration on {len(calib_eps)} training episodes x {args.samples_per_episode} samples (exact fraction "
        f"{args.exact_fraction}); action MSE on {len(mse_obs)} held-out samples of {len(val_eps)} validation "
        f"episodes; chunks: replan every {args.replan_every} ticks, blending {args.blending}; torch "
        f"{torch.__version__}, {args.jobs} evaluation processes x 1 thread; caches in {work}",
        flush=True,
    )

    t0 = time.time()
    template = (
        PlanTemplate(roles={**DEFAULT_ROLE_RULES, "projector": "auto", "action_head": "auto"})
        if args.quantize_all
        else PlanTemplate()
    )
    calibration = CalibrationConfig(
        exact_fraction=args.exact_fraction, store_dir=str(work / "sensitivity"), template=template
    )
    sens, info = calibrate_policy(
        policy,
        calib_eps,
        samples_per_episode=args.samples_per_episode,
        calibration=calibration,
        action_steps=args.objective_steps,
    )
    calib_s = time.time() - t0
    print(f"calibration: {calib_s:.0f} s ({info['samples']} samples)", flush=True)

    plans = []
    for solver in [s for s in args.solvers.split(",") if s]:
        for b in [float(x) for x in args.budgets.split(",") if x]:
            base = allocate(sens, b, AllocationConfig(solver=solver))
            plans.append((f"QVLA-{solver}", b, base))
            for label, options in variants:
                if "only_role" in options:  # the default allocation's rows of one role, every other row at 16 bits
                    plan = only_role(base, options["only_role"])
                else:
                    plan = allocate(sens, b, AllocationConfig(solver=solver, **options))
                plans.append((f"QVLA-{solver}-{label}", b, plan))
    layers = plans[0][2] if plans else allocate(sens, 16.0, AllocationConfig())
    for b in [int(x) for x in args.rtn.split(",") if x]:
        plans.append((f"RTN W{b} per-channel", float(b), uniform_plan(layers, b)))
    for b in [int(x) for x in args.layerwise.split(",") if x]:
        plans.append((f"RTN W{b} layer-wise", float(b), layerwise_plan(layers, b)))

    artifacts = [("FP (fp32)", None, None, policy)]  # the reference itself: deviation and MSE are 0 by definition
    for name, budget, plan in plans:
        out = work / f"{name.replace(' ', '_')}_{budget:g}"
        write_policy_once(policy, plan, out, plots_of=sens if name.startswith("QVLA") else None)
        artifacts.append((f"{name} {budget:g}" if name.startswith("QVLA") else name, budget, plan, out))
    for method, bits, group_size in baselines:
        t1 = time.time()
        out = work / f"baseline_{method}_{bits or 'mix'}{f'g{group_size}' if group_size else ''}"
        plan = None
        if is_artifact(out):
            plan = read_plan(out)
        else:
            plan = write_baseline_policy(policy, method, bits, group_size, calib_eps, args.samples_per_episode, out)
        label = (
            BASELINE_NAMES[method] + (f" W{bits}" if bits else " v4/l8/a8") + (f" g{group_size}" if group_size else "")
        )
        label += "A8" if plan.quant.activation.bits == 8 else ""
        print(f"{label}: {plan.method}, {plan.average_bits():.2f} bits, {time.time() - t1:.0f} s", flush=True)
        artifacts.append((label, round(plan.average_bits()), plan, out))

    def run_one(item):
        # a process per artifact: each has its own MuJoCo context and torch threads, and the 2 cores are used
        name, budget, plan, out = item
        cmd = [
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--eval-artifact",
            str(out),
            "--eval-name",
            name,
            "--threads",
            "1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"evaluating {out} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{name}: success {r['successes']}/{len(seeds)}, MSE {r['mse']:.3g} ({r['eval_s']:.0f} s, "
            f"{r['episodes_from_cache']} episodes from the cache)",
            flush=True,
        )
        bits, pruned = (32.0, 0.0) if plan is None else (plan.average_bits(), plan.pruned_fraction())
        # the per-row overhead (scales, zero points, row index) in bits per weight, beside the plan's average
        overhead = 0.0 if plan is None else artifact_summary(out)["overhead_bits_per_weight"]
        return {"method": name, "budget": budget, "avg_bits": bits, "overhead_bits": overhead, "pruned": pruned, **r}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_one, artifacts))
    add_statistics(rows)

    n = len(seeds)
    print()
    print(
        f"| method | avg bits | +overhead | weights (KiB) | pruned | success ({n} seeds) | 95% CI "
        f"| p vs FP (+won/-lost) | p vs RTN same bits | cum. deviation (Eq. 5) | action MSE vs FP |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['avg_bits']:.2f} | +{r['overhead_bits']:.2f} | {r['weight_bytes'] / 1024:.0f} "
            f"| {r['pruned']:.1%} | {r['successes']}/{n} = {r['success']:.0%} "
            f"| {r['ci'][0]:.0%}-{r['ci'][1]:.0%} | {_p(r.get('vs_fp'))} | {_p(r.get('vs_rtn'))} "
            f"| {r['cum_dev']:.3f} | {r['mse']:.3g} |"
        )
    print(
        f"\ncalibration (two-stage sensitivity, {info['samples']} samples): {calib_s:.0f} s; weights = all "
        "parameters as stored (quantized layers packed, the rest fp32); p: exact two-sided McNemar on the seeds "
        "where the two rows differ (+won/-lost by this row)"
    )
    plot = Path(args.plot) if args.plot else work / "success_vs_bits.png"
    plot_success(rows, plot, n)
    print(f"plot: {plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "calibration_s": calib_s, "seeds": seeds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
