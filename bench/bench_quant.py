"""QVLA vs uniform and layer-wise RTN on π0-shaped policies: action MSE vs full precision, weight bytes, calibration
time, for budgets {8, 6, 4, 3, 2.5}.

    .venv/bin/python bench/bench_quant.py                 # tiny π0 and the larger random π0 shape (~10 min, 2 cores)
    .venv/bin/python bench/bench_quant.py --models tiny   # ~1 min

What is measured, and what is not:
- The policies are RANDOM-WEIGHT π0s (transformers' PI0ForConditionalGeneration) fed random-but-fixed inputs in the
  π0 batch format; no trained checkpoint exists yet. The action MSE shows the mechanics (which method perturbs the
  denoised action chunk least at a given size), not task success.
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
- Weight bytes: measured with PackedLinear.weight_bytes() on a bf16 copy of the policy packed with each plan (codes,
  fp32 scale, uint8 zero, int32 row index, 16-bit rows in bf16), plus the unquantized projector/heads in bf16: what a
  GPU deployment stores. "+ovh": the per-row overhead of the packed layers in bits per weight beside the plan's
  average bits (8 x packed bytes / planned weights - avg bits; the same for an fp32 source since kept rows are
  16-bit there too). The MSE runs the packed fp32 model (fp32 only on this CPU).
- Timing: single-threaded torch (two threads on a shared 2-core machine were up to 10x slower), wall clock.
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
from qvla_quant.baselines import layerwise_plan, uniform_plan  # noqa: E402
from qvla_quant.packed import packed_layers, quantize_model  # noqa: E402
from qvla_quant.quantizer import QuantConfig, WeightQuantConfig  # noqa: E402

BUDGETS = (8.0, 6.0, 4.0, 3.0, 2.5)


def build(name: str):
    from transformers import PI0ForConditionalGeneration

    if name == "tiny":
        config, cams, text, action_dim = tiny_pi0_config(), 2, 6, 6
    else:
        config, cams, text, action_dim = random_pi0_config(1.0), 3, 20, 14
    torch.manual_seed(0)
    model = PI0ForConditionalGeneration(config).eval()
    adapter = Pi0Adapter(model, action_dim=action_dim)
    calib = [example_batch(config, 4, n_cameras=cams, text_len=text, seed=s) for s in (0, 1)]
    evals = [example_batch(config, 4, n_cameras=cams, text_len=text, seed=s) for s in (100, 101)]
    return adapter, calib, evals


def stored_bytes(model: torch.nn.Module) -> int:
    """Weight bytes of every quantizable layer as stored: packed layers by their buffers, float ones in full."""
    total = sum(m.weight_bytes() for _, m in packed_layers(model))
    total += sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if is_quantizable(m))
    return total


def evaluate(adapter: Pi0Adapter, plan, evals, reference) -> tuple[float, int, float, float]:
    """(action MSE vs FP, bf16 weight bytes, overhead bits per weight, seconds) of the policy packed with `plan`."""
    t0 = time.perf_counter()
    q = Pi0Adapter(quantize_model(copy.deepcopy(adapter.model), plan, inplace=True), action_dim=adapter.action_dim)
    actions = [q.predict(b) for b in evals]
    mse = sum(float((a - r).pow(2).mean()) for a, r in zip(actions, reference)) / len(evals)
    bf16 = quantize_model(copy.deepcopy(adapter.model).to(torch.bfloat16), plan, inplace=True)
    packed = sum(m.weight_bytes() for _, m in packed_layers(bf16))
    overhead = 8 * packed / sum(lp.n_weights for lp in plan.layers.values()) - plan.average_bits()
    return mse, stored_bytes(bf16), overhead, time.perf_counter() - t0


def run_model(name: str, args) -> dict:
    print(f"\n=== {name} π0 (random weights, random-but-fixed inputs) ===", flush=True)
    adapter, calib, evals = build(name)
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

    def add(budget, method, plan, extra=""):
        mse, nbytes, overhead, secs = evaluate(adapter, plan, evals, reference)
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
        if budget in (8.0, 4.0):
            b = int(budget)
            add(budget, f"rtn-channel W{b}", uniform_plan(template, b))
            add(budget, f"rtn-channel W{b}+clip", uniform_plan(template, b, quant=clip))
            add(budget, f"rtn-layer W{b}", layerwise_plan(template, b))
    if 2.5 in args.budgets:
        add(2.0, "rtn-channel W2", uniform_plan(template, 2))
        add(2.0, "rtn-channel W2+clip", uniform_plan(template, 2, quant=clip))
        add(2.0, "rtn-layer W2", layerwise_plan(template, 2))

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,large")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-per-pass", type=int, default=32)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.budgets = tuple(float(b) for b in args.budgets.split(","))
    # exact refinement: 5% of the channels per bit on the tiny model, 0.5% on the larger one (CPU time)
    args.exact_fraction = {"tiny": 0.05, "large": 0.005}
    torch.set_num_threads(args.threads)
    print(
        "bench_quant: random-weight π0 policies with random-but-fixed inputs (no trained policy yet); action MSE is "
        f"vs the FP policy on held-out inputs. torch {torch.__version__}, {args.threads} thread(s), fp32 CPU."
    )
    results = [run_model(name, args) for name in args.models.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
