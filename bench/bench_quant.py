"""QVLA vs uniform and layer-wise RTN on π0-shaped policies: action MSE vs full precision, weight bytes, calibration
time, for budgets {8, 6, 4, 3, 2.5}.

    .venv/bin/python bench/bench_quant.py                 # tiny π0 and the larger random π0 shape (~10 min, 2 cores)
    .venv/bin/python bench/bench_quant.py --models tiny   # ~1 min
    .venv/bin/python bench/bench_quant.py --models committed --baselines awq,gptq,smoothquant,module
                                  # the trained policy (models/sim_transfer_cube_fp) on recorded episodes of
                                  # data/demos: its training episodes calibrate, its held-out ones evaluate
    .venv/bin/python bench/bench_quant.py --rtn-groups    # only uniform RTN W8/W4/W3/W2, per-row vs group-wise (~5 min)
    .venv/bin/python bench/bench_quant.py --alloc-only    # only the allocation section: solvers' time and gaps (~3 min)
    .venv/bin/python bench/bench_quant.py --calibration-timing --timing-episodes /tmp/demos
                                  # only calibration of the committed policy with/without the reused VLM prefix
    .venv/bin/python bench/bench_quant.py --groups 128    # only QVLA with/without grouped choices on the committed
                                  # policy, teacher-forced on recorded episodes, at 3 and 2.5 bits (~15 min, 2 cores)

What is measured, and what is not:
- "tiny" and "large" are RANDOM-WEIGHT π0s (transformers' PI0ForConditionalGeneration) fed random-but-fixed inputs
  in the π0 batch format: their action MSE shows the mechanics (which method perturbs the denoised action chunk
  least at a given size), not task success. "committed" is the trained policy on recorded observations (teacher
  forcing: the chunk predicted from a demonstration's observation, not a rollout; closed loop is bench_policy.py).
- Calibration: 8 samples (2 batches of 4) of one seed; evaluation: 8 held-out samples of other seeds. Both use the
  adapter's fixed seeded noise, so FP and quantized policies denoise the same noise.
- QVLA: two-stage sensitivity (aligned proxy for every channel, exact Eq. 4 for the top fraction per bit and a
  random sample) with the MSE clip search, then the paper's staged greedy ("qvla-greedy") and the Lagrangian solver
  ("qvla-lagr"). Layers: vision + language + action expert ("auto"); projector and action in/out heads stay in the
  source dtype and out of the budget (the paper's setting), for every method alike.
- Uniform RTN: every row of the same layers at b bits, per-row min-max scale/zero (the runtime's baseline, no clip
  search); "+clip" is the same with QVLA's clip search, so that the allocation and the quantizer can be told apart.
  W8 and W4 sit at budgets 8 and 4; W2 (budget 2) is listed below the 2.5 budget as the nearest uniform point.
  Layer-wise RTN: one scale/zero per tensor (LayerPlan.granularity "tensor").
- LLM-derived baselines (`qvla_quant.llm_baselines`, the same calibration samples, the same layers): AWQ W8/W4/W3/W2
  (activation-aware scales folded into the preceding norms / linears, grid over alpha), GPTQ W8/W4/W3/W2 per-row and
  W4 with groups of 64 columns (Hessian error compensation, its exact codes packed), SmoothQuant W8A8 (beside plain
  RTN W8A8: the runtime's per-token int8 activations on every planned layer) and the module-wise mix "as in
  industrial practice" (vision 4 bits, language model and action expert 8; listed at its average bits).
- `--rtn-groups` (issue 11, no calibration): per-channel RTN at W8/W4/W3/W2 against group-wise RTN (one scale and
  zero per 128 or 64 weights along K) on the same layers, plain and "+clip"; "avg bits" counts a grouped row's
  extra scales and zero points (40 bits per group beyond the first), "|dW|2/|W|2" is the quantizer's relative
  squared weight error over those layers (the policy left out).
- Weight bytes: measured with PackedLinear.weight_bytes() on a bf16 copy of the policy packed with each plan (codes,
  fp32 scale, uint8 zero, int32 row index, 16-bit rows in bf16), plus the unquantized projector/heads in bf16: what a
  GPU deployment stores. "+ovh": the per-row overhead of the packed layers in bits per weight beside the plan's
  average bits (8 x packed bytes / planned weights - avg bits; the same for an fp32 source since kept rows are
  16-bit there too). The MSE runs the packed fp32 model (fp32 only on this CPU).
- Timing: single-threaded torch (two threads on a shared 2-core machine were up to 10x slower), wall clock.
- `--calibration-timing` (issue 11.5): models/sim_transfer_cube_fp calibrated on recorded sim episodes
  (`qvla-sim record-demos --out /tmp/demos -n 4`; --timing-samples-per-episode each, batches of 8, the
  processor the robot uses), two-stage aligned proxy for all channels, exact for the top --timing-exact-fraction,
  once with the VLM prefix reused for the action expert's exact passes (CalibrationConfig.prefix_cache) and once
  without, in the same process; prints both times and the largest difference of the two sensitivity tables.
- `--groups G[,G2]` (issue 11, group-wise scales chosen per row): models/sim_transfer_cube_fp (a trained policy)
  calibrated on recorded episodes of data/demos (--groups-calib-episodes episodes x --groups-samples-per-episode
  observations, the processor the robot uses; two-stage, aligned proxy, exact for the top --groups-exact-fraction
  per column and 64 random pairs), once per-row only and once per group size with the grouped columns
  (CalibrationConfig.group_size); then QVLA (greedy, lagrangian) at --groups-budgets (3, 2.5) without grouped
  choices (the per-row calibration), with them, and with them switched off on the grouped calibration's own tables
  (AllocationConfig(groups=False): the same numbers, so the difference is the choice alone), beside uniform RTN
  W3 per-row and W2 grouped. Action MSE: teacher forcing, i.e. the policy's action chunk on recorded observations
  of --groups-eval-episodes other episodes (the robot's processor, the adapter's fixed noise), against the FP
  policy's chunk on the same observations; not a closed-loop rollout. "avg bits" is the plan's budget measure (a
  grouped row's extra scales and zero points included), "stored" the packed bits per planned weight (bf16 copy:
  codes, fp32 scales, uint8 zeros, int32 row indices, 16-bit rows), "grouped" the share of planned rows stored
  with group-wise scales.
- Allocation section (after the models, or alone with `--alloc-only`): time and gap to the lower bound of the paper's
  greedy and of the optimal solver ("lagrangian": Lagrangian sweep + exact repair of the open core) on (a) a
  synthetic problem of 10 M channels x 5 bit choices shaped like measured sensitivities (log-normal gains per
  channel and layer, 10x less error at 2 bits then 16x less per 2 more bits; fan-ins 512..4096; the default 50%
  per-layer prune cap, which binds at the lower budgets) and (b) the committed policy's layers
  (models/sim_transfer_cube_fp): its artifact stores no sensitivities, so they are recomputed with the proxy only
  on 2 random-but-fixed input samples (~10 s; robot episodes rank channels differently: the point is the solvers on
  the real layer shapes). Times: wall and process-CPU seconds (the CPU figure is what the shared machine's load
  does not inflate); "build" is AllocationProblem construction, the solver column the allocation itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qvla_quant import AllocationConfig, CalibrationConfig, Pi0Adapter, allocate, calibrate  # noqa: E402
from qvla_quant.adapters.base import is_quantizable  # noqa: E402
from qvla_quant.adapters.pi0 import example_batch, random_pi0_config, tiny_pi0_config  # noqa: E402
from qvla_quant.allocation import AllocationProblem, greedy_allocate, solve  # noqa: E402
from qvla_quant.baselines import layerwise_plan, uniform_plan  # noqa: E402
from qvla_quant.config import QuantConfig, WeightQuantConfig  # noqa: E402
from qvla_quant.layers import LayerDesc  # noqa: E402
from qvla_quant.llm_baselines import gptq, module_wise, quantized_bits, run_baseline, smoothquant  # noqa: E402
from qvla_quant.transforms import packed_layers, quantize_model  # noqa: E402

BUDGETS = (8.0, 6.0, 4.0, 3.0, 2.5)


def build(name: str, args=None):
    """(adapter, calibration batches, evaluation batches) of one model of --models: "tiny" and "large" are random-
    weight π0s on random-but-fixed inputs, "committed" the trained policy (--timing-policy) calibrated on
    --committed-calib-episodes of its own training episodes and evaluated (teacher forcing) on its held-out
    validation episodes, --committed-samples-per-episode observations each, from --timing-episodes."""
    if name == "committed":
        return build_committed(args)
    from transformers import PI0ForConditionalGeneration

    if name == "tiny":
        config, cams, text, action_dim = tiny_pi0_config(), 2, 6, 6
    elif name == "large":
        config, cams, text, action_dim = random_pi0_config(1.0), 3, 20, 14
    else:
        raise SystemExit(f"bench_quant: unknown model {name!r} in --models (tiny, large, committed)")
    torch.manual_seed(0)
    model = PI0ForConditionalGeneration(config).eval()
    adapter = Pi0Adapter(model, action_dim=action_dim)
    calib = [example_batch(config, 4, n_cameras=cams, text_len=text, seed=s) for s in (0, 1)]
    evals = [example_batch(config, 4, n_cameras=cams, text_len=text, seed=s) for s in (100, 101)]
    return adapter, calib, evals


def build_committed(args):
    from bench_policy import held_out_episodes
    from qvla_ros.policy.quantize import calibration_batches, policy_adapter
    from qvla_ros.policy.train import list_episodes

    policy = Path(args.timing_policy)
    train_eps, val_eps = held_out_episodes(policy, list_episodes(args.timing_episodes))
    n = args.committed_calib_episodes
    calib_eps = train_eps[:: max(1, len(train_eps) // n)][:n]  # spread over the demonstrations, as bench_policy
    processor, adapter = policy_adapter(policy)
    per = args.committed_samples_per_episode
    calib = calibration_batches(calib_eps, processor, per, 8, seed=0).batches
    evals = calibration_batches(val_eps, processor, per, 8, seed=1).batches
    print(f"committed policy {policy}: calibration {sum(adapter.batch_size(b) for b in calib)} observations of "
          f"{len(calib_eps)} training episodes, evaluation {sum(adapter.batch_size(b) for b in evals)} observations "
          f"of its {len(val_eps)} held-out episodes (teacher forcing, the adapter's fixed noise)")  # fmt: skip
    return adapter, calib, evals


def stored_bytes(model: torch.nn.Module) -> int:
    """Weight bytes of every quantizable layer as stored: packed layers by their buffers, float ones in full."""
    total = sum(m.weight_bytes() for _, m in packed_layers(model))
    total += sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if is_quantizable(m))
    return total


def evaluate(adapter: Pi0Adapter, plan, evals, reference, qparams=None) -> tuple[float, int, float, float]:
    """(action MSE vs FP, bf16 weight bytes, overhead bits per weight, seconds) of the policy packed with `plan`
    (qparams: explicit scale/zero of some layers, GPTQ's)."""
    t0 = time.perf_counter()
    qmodel = quantize_model(copy.deepcopy(adapter.model), plan, inplace=True, qparams=qparams)
    q = Pi0Adapter(qmodel, action_dim=adapter.action_dim)
    actions = [q.predict(b) for b in evals]
    mse = sum(float((a - r).pow(2).mean()) for a, r in zip(actions, reference)) / len(evals)
    bf16 = quantize_model(copy.deepcopy(adapter.model).to(torch.bfloat16), plan, inplace=True, qparams=qparams)
    packed = sum(m.weight_bytes() for _, m in packed_layers(bf16))
    overhead = 8 * packed / sum(lp.n_weights for lp in plan.layers.values()) - plan.average_bits()
    return mse, stored_bytes(bf16), overhead, time.perf_counter() - t0


def run_model(name: str, args) -> dict:
    what = "trained policy, recorded observations" if name == "committed" else "random weights, random-but-fixed inputs"
    print(f"\n=== {name} π0 ({what}) ===", flush=True)
    adapter, calib, evals = build(name, args)
    infos = adapter.layers()
    n_weights = sum(i.n_weights for i in infos)
    roles = {}
    for i in infos:
        roles[i.role] = roles.get(i.role, 0) + i.n_weights
    by_role = ", ".join(f"{r} {n:,}" for r, n in roles.items())
    print(
        f"{len(infos)} linear/conv layers, {n_weights:,} weights ({by_role}); chunk "
        f"{adapter.model.config.chunk_size} x {adapter.action_dim} used dims, "
        f"{adapter.model.config.num_inference_steps} denoising steps"
    )
    reference = [adapter.predict(b) for b in evals]
    scale = sum(float(r.pow(2).mean()) for r in reference) / len(reference)

    config = CalibrationConfig(
        exact_fraction=args.exact_fraction[name], rank_sample=64, channels_per_pass=args.channels_per_pass,
        progress=not args.quiet,
    )  # fmt: skip
    t0 = time.perf_counter()
    sens = calibrate(adapter, calib, config)
    calib_s = time.perf_counter() - t0
    r = sens.report
    rank = r["rank_correlation"]
    print(f"calibration: {calib_s:.1f} s (proxy {r['time_s']['proxy']:.1f} s with {r['probes']} probes, exact "
          f"{r['time_s']['exact']:.1f} s for {r['n_exact_top']} top + {r['n_rank_sample']} sampled channel-bits) on "
          f"{r['n_samples']} samples; {r['n_channels']:,} channels, {len(sens.dead_layers)} dead layers")  # fmt: skip
    for key in ("aligned", "gain"):
        per_bit = ", ".join(f"{b}b {rank[key][str(b)]:.3f}" for b in (0, 2, 4, 8))
        print(f"  spearman(exact, {key:7s} proxy) on {rank[key]['n']} random channel-bits: {rank[key]['all']:.3f} "
              f"({per_bit})")  # fmt: skip

    fp_bytes = stored_bytes(copy.deepcopy(adapter.model).to(torch.bfloat16))
    rows = []

    def add(budget, method, plan, extra="", result=None):
        # result: an llm_baselines.BaselineResult (its transformed float copy is what gets packed)
        source = adapter if result is None else result.adapter
        mse, nbytes, overhead, secs = evaluate(source, plan, evals, reference, result.qparams if result else None)
        rows.append(
            {"budget": budget, "method": method, "avg_bits": plan.average_bits(), "overhead_bits": overhead,
             "mse": mse, "rel_mse": mse / scale, "bytes": nbytes, "ratio": nbytes / fp_bytes, "note": extra,
             "eval_s": secs}
        )  # fmt: skip

    template = allocate(sens, 16.0)  # every calibrated layer at 16: the layer set the baselines quantize too
    clip = QuantConfig(weight=WeightQuantConfig())
    for budget in args.budgets:
        for solver, label in (("greedy", "qvla-greedy"), ("lagrangian", "qvla-lagr")):
            plan = allocate(sens, budget, AllocationConfig(solver=solver))
            a = plan.info["allocation"]
            add(budget, label, plan, f"gap {a['relative_gap']:.2f}, pruned {a['pruned_rows']}")
        if budget in (8.0, 4.0, 3.0):
            b = int(budget)
            add(budget, f"rtn-channel W{b}", uniform_plan(template, b))
            add(budget, f"rtn-channel W{b}+clip", uniform_plan(template, b, quant=clip))
            if budget != 3.0:
                add(budget, f"rtn-layer W{b}", layerwise_plan(template, b))
    if 2.5 in args.budgets:
        add(2.0, "rtn-channel W2", uniform_plan(template, 2))
        add(2.0, "rtn-channel W2+clip", uniform_plan(template, 2, quant=clip))
        add(2.0, "rtn-layer W2", layerwise_plan(template, 2))

    # the LLM-derived baselines (qvla_quant.llm_baselines), calibrated on the same samples as QVLA
    baselines = [m for m in args.baselines.split(",") if m]
    points = [int(b) for b in args.budgets if b in (8.0, 4.0, 3.0)] + ([2] if 2.5 in args.budgets else [])
    for method in ("awq", "gptq"):
        if method not in baselines:
            continue
        for b in points:
            if b == 3 and 3 not in quantized_bits():
                continue
            t0 = time.perf_counter()
            res = run_baseline(method, adapter, calib, bits=b)
            add(float(b), f"{method} W{b}", res.plan, f"calibration {time.perf_counter() - t0:.1f} s", res)
        if method == "gptq" and 4 in points:
            t0 = time.perf_counter()
            res = gptq(adapter, calib, 4, group_size=64)
            add(4.0, "gptq W4 g64", res.plan, f"calibration {time.perf_counter() - t0:.1f} s", res)
    if "smoothquant" in baselines and 8 in points:
        t0 = time.perf_counter()
        res = smoothquant(adapter, calib, 8)
        add(8.0, "smoothquant W8A8", res.plan, f"calibration {time.perf_counter() - t0:.1f} s", res)
        add(8.0, "rtn-channel W8A8", uniform_plan(template, 8, activation_bits=8), "no smoothing")
    if "module" in baselines:
        res = module_wise(adapter)  # vision 4, language 8, action 8
        add(round(res.plan.average_bits(), 2), "module v4/l8/a8", res.plan, "RTN rows, bits by role", res)

    print(f"FP weights (bf16, all linear/conv layers): {fp_bytes / 2**20:.2f} MiB; mean action^2 {scale:.4g}; "
          "MSE from the packed model's forward")  # fmt: skip
    head = f"{'budget':>6}  {'method':<20} {'avg bits':>8} {'+ovh':>6} {'action MSE':>11} {'MSE/E[a^2]':>10} " \
           f"{'weight MiB':>10} {'vs FP':>6}  note"  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['budget']:>6g}  {row['method']:<20} {row['avg_bits']:>8.3f} {row['overhead_bits']:>+6.3f} "
              f"{row['mse']:>11.3e} "
              f"{row['rel_mse']:>10.2e} {row['bytes'] / 2**20:>10.3f} {row['ratio']:>6.3f}  {row['note']}")  # fmt: skip
    return {"model": name, "calibration_s": calib_s, "report": r, "fp_bytes": fp_bytes, "rows": rows}


# ---- issue 11 (beyond the paper): 3-bit rows and group-wise scales, uniform RTN only (no calibration or allocation)
# (bits, group size or None, clip search): per-channel RTN W8/W4/W3/W2 and group-wise RTN at g = 128 and 64
RTN_GROUP_ROWS = tuple(
    (b, g, clip) for b, g in ((8, None), (4, None), (3, None), (2, None), (4, 128), (3, 128), (2, 128), (4, 64),
                              (3, 64), (2, 64)) for clip in (False, True)
)  # fmt: skip


def run_rtn_groups(name: str, args) -> dict:
    """`--rtn-groups`: uniform per-channel RTN at W8/W4/W3/W2 against group-wise RTN (g = 128, 64) on the layers QVLA
    quantizes (the default template's "auto" layers): action MSE vs FP on the held-out inputs, the plan's average
    bits (a grouped row's extra scales and zeros included), the per-row overhead beside it and the bf16 bytes."""
    from qvla_quant.baselines import grouped_plan
    from qvla_quant.roles import PlanTemplate

    print(f"\n=== {name} π0: uniform RTN, per-row vs group-wise scales (random weights, fixed inputs) ===", flush=True)
    adapter, _, evals = build(name)
    template = PlanTemplate()
    spec = [i for i in adapter.layers()
            if template.rule_for(i.name, i.role) == "auto"]  # fmt: skip
    fan_ins = sorted({s[4] for s in spec})
    reference = [adapter.predict(b) for b in evals]
    scale = sum(float(r.pow(2).mean()) for r in reference) / len(reference)
    fp_bytes = stored_bytes(copy.deepcopy(adapter.model).to(torch.bfloat16))
    clip = QuantConfig(weight=WeightQuantConfig())
    weights = {i.name: i.module.weight.detach() for i in adapter.layers()}
    w_energy = sum(float(weights[s[0]].pow(2).sum()) for s in spec)

    def weight_error(plan) -> float:
        """sum ||Q(W) - W||^2 / sum ||W||^2 over the planned layers: the quantizer alone, without the policy."""
        from qvla_quant.quantizer import fake_quantize_weight

        return sum(
            float((fake_quantize_weight(weights[n], lp.bits, plan.quant.weight, group_size=lp.group_size,
                                        grouped=lp.grouped) - weights[n]).pow(2).sum())
            for n, lp in plan.layers.items()
        ) / w_energy  # fmt: skip

    rows = []
    for bits, g, with_clip in RTN_GROUP_ROWS:
        kw = {"quant": clip} if with_clip else {}
        plan = uniform_plan(spec, bits, **kw) if g is None else grouped_plan(spec, bits, g, **kw)
        mse, nbytes, overhead, secs = evaluate(adapter, plan, evals, reference)
        method = (f"rtn-channel W{bits}" if g is None else f"rtn-group{g} W{bits}") + ("+clip" if with_clip else "")
        rows.append({"method": method, "bits": bits, "group_size": g, "clip": with_clip,
                     "avg_bits": plan.average_bits(), "overhead_bits": overhead, "mse": mse, "rel_mse": mse / scale,
                     "weight_err": weight_error(plan), "bytes": nbytes, "ratio": nbytes / fp_bytes,
                     "eval_s": secs})  # fmt: skip
    print(f"{len(spec)} layers, K in {fan_ins}; FP weights (bf16) {fp_bytes / 2**20:.2f} MiB; "
          f"mean action^2 {scale:.4g}")  # fmt: skip
    head = f"{'method':<22} {'avg bits':>8} {'+ovh':>6} {'action MSE':>11} {'MSE/E[a^2]':>10} {'|dW|2/|W|2':>10} " \
           f"{'weight MiB':>10} {'vs FP':>6}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['method']:<22} {row['avg_bits']:>8.3f} {row['overhead_bits']:>+6.3f} {row['mse']:>11.3e} "
              f"{row['rel_mse']:>10.2e} {row['weight_err']:>10.2e} {row['bytes'] / 2**20:>10.3f} "
              f"{row['ratio']:>6.3f}")  # fmt: skip
    return {"model": name, "block": "rtn-groups", "fp_bytes": fp_bytes, "rows": rows}


# ---- issue 11: the allocation solvers' time and gap to the lower bound (no policy evaluation)
def synthetic_tables(n_channels: int, seed: int = 0) -> list[tuple[LayerDesc, torch.Tensor]]:
    """Layers of 512..4096 rows with fan-in 512..4096 until n_channels rows; s like `random_tables` of the tests:
    a log-normal gain per row (sigma 2) and per layer, times an error 10x lower at 2 bits and 16x lower per 2 more
    bits, 30% log-normal noise, 0 at 16 bits."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([1.0, 0.1, 0.1 / 16, 0.1 / 4096, 0.0], dtype=torch.float64)
    items, total = [], 0
    while total < n_channels:
        out = min(int(torch.randint(512, 4097, (1,), generator=g)), n_channels - total)
        fan_in = (512, 1024, 2048, 4096)[int(torch.randint(0, 4, (1,), generator=g))]
        gain = torch.exp(2.0 * torch.randn(out, 1, generator=g, dtype=torch.float64) + torch.randn(1, generator=g))
        s = gain * decay * torch.exp(0.3 * torch.randn(out, 5, generator=g, dtype=torch.float64))
        items.append((LayerDesc(f"layer{len(items):05d}", "other", "linear", out, fan_in), s))
        total += out
    return items


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare_solvers(label: str, make_problem, budgets) -> list[dict]:
    """Both solvers on the problem of each budget: times, error, the optimal solver's lower bound, both gaps."""
    head = f"{'budget':>6}  {'solver':<10} {'build s':>7} {'wall s':>7} {'cpu s':>7} {'avg bits':>8} {'error':>11} " \
           f"{'lower bound':>11} {'rel gap':>9}  note"  # fmt: skip
    print(f"\n--- {label} ---\n{head}\n{'-' * len(head)}", flush=True)
    rows = []
    for budget in budgets:
        problem, build_wall, _ = _timed(lambda b=budget: make_problem(b))
        result, wall, cpu = _timed(lambda p=problem: solve(p))  # the config's solver: "lagrangian"
        a = result.info
        lower = a["lower_bound"]
        note = (f"{'proven optimal' if a['proven_optimal'] else 'NOT proven'}; optimum vs dual bound "
                f"{(a['total_error'] - a['dual_bound']) / a['dual_bound']:+.1e}; {a['core_channels']} channels "
                "left to the exact repair")  # fmt: skip
        greedy, g_wall, g_cpu = _timed(lambda p=problem: greedy_allocate(p))
        g_err = problem.error(greedy.bits, greedy.grouped)
        for solver, w, c, bits, grouped, err, extra in (
            ("lagrangian", wall, cpu, result.bits, result.grouped, a["total_error"], note),
            (
                "greedy",
                g_wall,
                g_cpu,
                greedy.bits,
                greedy.grouped,
                g_err,
                f"{g_err / a['total_error']:.2f}x the optimal error",
            ),
        ):
            gap = (err - lower) / lower if lower > 0 else 0.0
            avg = problem.total_bits(bits, grouped) / problem.n_weights
            print(f"{budget:>6g}  {solver:<10} {build_wall:>7.2f} {w:>7.2f} {c:>7.2f} {avg:>8.4f} {err:>11.5g} "
                  f"{lower:>11.5g} {gap:>9.2e}  {extra}", flush=True)  # fmt: skip
            rows.append({"set": label, "budget": budget, "solver": solver, "build_s": build_wall, "wall_s": w,
                         "cpu_s": c, "avg_bits": avg, "error": err, "lower_bound": lower, "relative_gap": gap,
                         "proven_optimal": a["proven_optimal"], "core_channels": a["core_channels"]})  # fmt: skip
        del problem, result, greedy
    return rows


def run_allocation(args) -> list[dict]:
    from qvla_quant.api import load_policy

    print(f"\n=== allocation: greedy (the paper) vs optimal (Lagrangian sweep + exact repair), torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s) ===", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    items = synthetic_tables(args.alloc_channels)
    n_weights = sum(m.out_features * m.fan_in for m, _ in items)
    print(f"synthetic: {args.alloc_channels:,} channels x 5 bit choices in {len(items)} layers, {n_weights:,} weights "
          f"(generated in {time.perf_counter() - t0:.1f} s); per-layer prune cap 50%", flush=True)  # fmt: skip
    config = AllocationConfig(solver="lagrangian")
    rows = compare_solvers(
        f"synthetic, {args.alloc_channels:,} channels",
        lambda b: AllocationProblem.from_tables(items, (0, 2, 4, 8, 16), b, config),
        args.alloc_budgets,
    )
    items.clear()  # 400 MB
    if args.alloc_policy and Path(args.alloc_policy).is_dir():
        adapter = load_policy(args.alloc_policy)
        batch = example_batch(adapter.model.config, 2, n_cameras=3, text_len=8, seed=0)
        calib = CalibrationConfig(method="proxy", rank_sample=0, n_probes=8, progress=False)
        sens, wall, _ = _timed(lambda: calibrate(adapter, [batch], calib))
        print(f"\n{args.alloc_policy}: {sens.total_channels():,} channels; proxy sensitivities of 2 random-input "
              f"samples recomputed in {wall:.1f} s (the artifact stores none)", flush=True)  # fmt: skip
        rows += compare_solvers(
            f"committed policy {Path(args.alloc_policy).name}",
            lambda b: AllocationProblem.from_sensitivity(sens, b, config),
            args.alloc_budgets,
        )
    return rows


def run_groups(args) -> dict:
    """`--groups`: QVLA with and without grouped choices on the committed policy at --groups-budgets (module
    docstring): teacher-forced action MSE vs FP, the plan's average bits and the stored bits per weight."""
    from qvla_quant.baselines import grouped_plan
    from qvla_ros.policy.quantize import calibration_batches, policy_adapter

    policy = Path(args.timing_policy)
    episodes = sorted(p for p in Path(args.timing_episodes).iterdir() if p.is_dir())
    n_cal, n_eval = args.groups_calib_episodes, args.groups_eval_episodes
    if len(episodes) < n_cal + n_eval:
        raise SystemExit(f"--groups needs {n_cal + n_eval} episodes in {args.timing_episodes}, found {len(episodes)}")
    processor, adapter = policy_adapter(policy)
    per = args.groups_samples_per_episode
    calib = calibration_batches(episodes[:n_cal], processor, per, 8, seed=0).batches
    evals = calibration_batches(episodes[n_cal : n_cal + n_eval], processor, per, 8, seed=1).batches
    n_calib, n_evals = (sum(adapter.batch_size(b) for b in x) for x in (calib, evals))
    reference = [adapter.predict(b) for b in evals]
    scale = sum(float(r.pow(2).mean()) for r in reference) / len(reference)
    print(f"\n=== group-wise scales chosen per row: {policy.name}, calibration {n_calib} observations of {n_cal} "
          f"recorded episodes, evaluation (teacher forcing) {n_evals} observations of {n_eval} other episodes; "
          f"action MSE vs FP; mean FP action^2 {scale:.4g} ===", flush=True)  # fmt: skip
    sens, calib_s = {}, {}
    for g in (None, *args.groups):
        config = CalibrationConfig(
            exact_fraction=args.groups_exact_fraction, rank_sample=64, channels_per_pass=args.channels_per_pass,
            progress=not args.quiet, group_size=g,
        )  # fmt: skip
        t0 = time.perf_counter()
        sens[g] = calibrate(adapter, calib, config)
        calib_s[g] = time.perf_counter() - t0
        r = sens[g].report
        print(f"calibration {'per-row' if g is None else f'g{g}'}: {calib_s[g]:.1f} s, columns "
              f"{[c.label for c in sens[g].choices]}, {r['n_exact_rows']} rows exact, spearman(exact, aligned) "
              f"{r['rank_correlation']['aligned']['all']:.3f} on {r['rank_correlation']['aligned']['n']} pairs",
              flush=True)  # fmt: skip
    template = allocate(sens[None], 16.0)  # the layer set QVLA plans, for the RTN rows
    clip = QuantConfig(weight=WeightQuantConfig())
    rows = []

    def add(budget, method, plan, note=""):
        mse, _, overhead, secs = evaluate(adapter, plan, evals, reference)
        n_rows = sum(lp.out_features for lp in plan.layers.values())
        grouped = sum(sum(lp.grouped or []) for lp in plan.layers.values()) / n_rows
        rows.append({"budget": budget, "method": method, "avg_bits": plan.average_bits(),
                     "stored_bits": plan.average_bits() + overhead, "grouped": grouped, "mse": mse,
                     "rel_mse": mse / scale, "note": note, "eval_s": secs})  # fmt: skip
        row = rows[-1]
        print(f"{budget:>6g}  {method:<26} {row['avg_bits']:>8.3f} {row['stored_bits']:>7.3f} {grouped:>7.1%} "
              f"{mse:>11.3e} {mse / scale:>10.2e}  {note}", flush=True)  # fmt: skip

    head = f"{'budget':>6}  {'method':<26} {'avg bits':>8} {'stored':>7} {'grouped':>7} {'action MSE':>11} " \
           f"{'MSE/E[a^2]':>10}  note"  # fmt: skip
    print(f"{head}\n{'-' * len(head)}", flush=True)
    labels = {"greedy": "qvla-greedy", "lagrangian": "qvla-lagr"}
    for budget in args.groups_budgets:
        for solver in ("greedy", "lagrangian"):
            plan = allocate(sens[None], budget, AllocationConfig(solver=solver))
            error = plan.info["allocation"]["total_error"]
            add(budget, labels[solver], plan, f"per-row calibration; error {error:.3e}")
            for g in args.groups:
                for groups in (True, False):
                    plan = allocate(sens[g], budget, AllocationConfig(solver=solver, groups=groups))
                    a = plan.info["allocation"]
                    name = f"{labels[solver]} g{g}" + ("" if groups else " off")
                    what = "grouped choices" if groups else "same tables, grouped choices off"
                    add(budget, name, plan, f"{what}; error {a['total_error']:.3e}")
        if budget == 3.0:
            add(3.0, "rtn-channel W3+clip", uniform_plan(template, 3, quant=clip))
        if budget == 2.5:
            for g in args.groups:
                add(2.5, f"rtn-group{g} W2+clip", grouped_plan(template, 2, g, quant=clip), "nearest uniform point")
    return {"block": "groups", "policy": str(policy), "n_calib": n_calib, "n_eval": n_evals,
            "calibration_s": {str(k): v for k, v in calib_s.items()}, "rows": rows}  # fmt: skip


def run_calibration_timing(args) -> dict:
    """Issue 11.5: calibration of the committed policy with and without the reused VLM prefix (same run, same data),
    and the largest difference between the two sensitivity tables."""
    from qvla_ros.policy.quantize import calibration_batches, policy_adapter

    policy = Path(args.timing_policy)
    episodes = sorted(p for p in Path(args.timing_episodes).iterdir() if p.is_dir())
    processor, adapter = policy_adapter(policy)
    data = calibration_batches(episodes, processor, args.timing_samples_per_episode, 8)
    n_samples = sum(adapter.batch_size(b) for b in data.batches)
    print(f"\n=== calibration timing: {policy.name}, {n_samples} samples from {len(episodes)} recorded episodes "
          f"({args.timing_episodes}), proxy for all channels, top {args.timing_exact_fraction:.1%} exact per bit, "
          f"rank sample {args.timing_rank_sample}, {args.channels_per_pass} channels per pass ===",
          flush=True)  # fmt: skip
    runs = {}
    for cached in (True, False):
        config = CalibrationConfig(
            exact_fraction=args.timing_exact_fraction, rank_sample=args.timing_rank_sample,
            channels_per_pass=args.channels_per_pass, progress=not args.quiet, prefix_cache=cached,
        )  # fmt: skip
        t0 = time.perf_counter()
        sens = calibrate(adapter, data.batches, config)
        runs[cached] = (sens, time.perf_counter() - t0)
    worst_abs = worst_rel = 0.0
    for name in runs[True][0].layers:
        a, b = runs[True][0].values(name), runs[False][0].values(name)
        worst_abs = max(worst_abs, float((a - b).abs().max()))
        worst_rel = max(worst_rel, float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()))
    rows = []
    print(f"{'prefix cache':<14} {'total s':>9} {'proxy s':>9} {'exact s':>9} {'exact jobs':>11} {'rows':>6}")
    for cached in (False, True):
        sens, total = runs[cached]
        r = sens.report
        t = r["time_s"]
        rows.append({"prefix_cache": cached, "total_s": total, "proxy_s": t["proxy"], "exact_s": t["exact"],
                     "exact_jobs": r["n_exact_jobs"], "exact_rows": r["n_exact_rows"]})  # fmt: skip
        print(f"{'on' if cached else 'off':<14} {total:>9.1f} {t['proxy']:>9.1f} {t['exact']:>9.1f} "
              f"{r['n_exact_jobs']:>11} {r['n_exact_rows']:>6}")  # fmt: skip
    off, on = rows
    by_role = {}
    for layer in runs[True][0].layers.values():
        if layer.exact is not None and not layer.dead:
            n = int(torch.isfinite(layer.exact[:, :-1]).all(1).sum())
            by_role[layer.role] = by_role.get(layer.role, 0) + n
    print("rows measured exactly, by role: " + ", ".join(f"{k} {v}" for k, v in by_role.items()))
    print(f"ratio on/off: total {on['total_s'] / off['total_s']:.3f}, "
          f"exact stage {on['exact_s'] / off['exact_s']:.3f}; "
          f"max |s_on - s_off| = {worst_abs:.3e} (relative {worst_rel:.3e})")  # fmt: skip
    # the exact stage of one action-expert layer alone (what the prefix cache speeds up): 64 channels at 2 bits
    from qvla_quant import sensitivity as S

    prepared = S._prepare(adapter, data.batches, 0)
    info = next(i for i in adapter.layers() if i.name == "model.dit.layers.1.mlp.gate_proj")
    jobs = [(r, 2) for r in range(64)]
    layer_rows = {}
    for cached in (False, True):
        t0 = time.perf_counter()
        values = S.exact_sensitivity(adapter, prepared, info, jobs, (2,), WeightQuantConfig(), channels_per_pass=16,
                                     prefixes=S._Prefixes(adapter) if cached else None)  # fmt: skip
        layer_rows[cached] = (values, time.perf_counter() - t0)
    same = torch.equal(layer_rows[True][0], layer_rows[False][0])
    print(f"{info.name}, 64 channels x 2 bits, 4 passes x {len(prepared)} batches (references included): "
          f"{layer_rows[False][1]:.1f} s without the prefix cache, {layer_rows[True][1]:.1f} s with it (ratio "
          f"{layer_rows[True][1] / layer_rows[False][1]:.3f}); identical: {same}")  # fmt: skip
    layer_timing = {"layer": info.name, "off_s": layer_rows[False][1], "on_s": layer_rows[True][1], "identical": same}
    return {"block": "calibration-timing", "policy": str(policy), "n_samples": n_samples, "rows": rows,
            "expert_layer": layer_timing,
            "max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "exact_rows_by_role": by_role}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,large")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-per-pass", type=int, default=32)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--baselines",
        default="awq,gptq,smoothquant,module",
        help="LLM-derived baseline rows (qvla_quant.llm_baselines); '' for none",
    )
    parser.add_argument(
        "--rtn-groups",
        action="store_true",
        help="only the RTN block: per-row W8/W4/W3/W2 vs group-wise (g 128, 64); no calibration",
    )
    parser.add_argument("--alloc-only", action="store_true", help="only the allocation section (solvers' time, gaps)")
    parser.add_argument("--alloc-channels", type=int, default=10_000_000, help="channels of the synthetic problem")
    parser.add_argument("--alloc-budgets", default="4,3,2", help="budgets of the allocation section")
    parser.add_argument("--alloc-policy", default=str(Path(__file__).resolve().parents[1] / "models" /
                        "sim_transfer_cube_fp"), help="policy whose layers it uses too ('': none)")  # fmt: skip
    parser.add_argument(
        "--calibration-timing",
        action="store_true",
        help="only issue 11.5's block: calibration of --timing-policy with and without the VLM prefix",
    )
    parser.add_argument("--timing-policy", default=str(Path(__file__).resolve().parents[1] / "models" /
                        "sim_transfer_cube_fp"))  # fmt: skip
    parser.add_argument(
        "--timing-episodes",
        default=str(Path(__file__).resolve().parents[1] / "data" / "demos"),
        help="recorded episodes (qvla-sim record-demos --out data/demos)",
    )
    parser.add_argument("--timing-samples-per-episode", type=int, default=4)
    parser.add_argument("--committed-calib-episodes", type=int, default=16)
    parser.add_argument("--committed-samples-per-episode", type=int, default=2)
    parser.add_argument("--timing-exact-fraction", type=float, default=0.05)
    parser.add_argument("--timing-rank-sample", type=int, default=64)
    parser.add_argument(
        "--groups",
        help="only the grouped-choice block: QVLA with/without grouped choices at these "
        "group sizes (e.g. 128 or 128,64) on --timing-policy, episodes from --timing-episodes",
    )
    parser.add_argument("--groups-budgets", default="3,2.5")
    parser.add_argument("--groups-calib-episodes", type=int, default=4)
    parser.add_argument("--groups-eval-episodes", type=int, default=4)
    parser.add_argument("--groups-samples-per-episode", type=int, default=2)
    parser.add_argument("--groups-exact-fraction", type=float, default=0.01)
    args = parser.parse_args(argv)
    args.budgets = tuple(float(b) for b in args.budgets.split(","))
    args.alloc_budgets = tuple(float(b) for b in args.alloc_budgets.split(","))
    # exact refinement: 5% of the channels per bit on the tiny model, 0.5% on the larger one (CPU time)
    args.exact_fraction = {"tiny": 0.05, "large": 0.005, "committed": args.timing_exact_fraction}
    torch.set_num_threads(args.threads)
    results = []
    if args.groups:
        args.groups = tuple(int(g) for g in args.groups.split(","))
        args.groups_budgets = tuple(float(b) for b in args.groups_budgets.split(","))
        results = [run_groups(args)]
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        return 0
    if args.calibration_timing:
        results = [run_calibration_timing(args)]
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        return 0
    if not args.alloc_only:
        print(
            f"bench_quant: models {args.models} (tiny, large: random-weight π0s on random-but-fixed inputs; committed: "
            "the trained policy on recorded observations); action MSE is vs the FP policy on held-out inputs. "
            f"torch {torch.__version__}, {args.threads} thread(s), fp32 CPU."
        )
        run = run_rtn_groups if args.rtn_groups else run_model
        results = [run(name, args) for name in args.models.split(",")]
    if args.alloc_only or not args.rtn_groups:
        results.append({"block": "allocation", "rows": run_allocation(args)})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
