"""The full-size π0 on a CPU: artifact size, memory to quantize / load / run, and one action chunk's latency, bf16 vs
packed.

    PYTHONPATH=src .venv/bin/python bench/bench_full_pi0.py --threads 2                 # published size
    PYTHONPATH=src .venv/bin/python bench/bench_full_pi0.py --scale 0.25 --threads 2    # a quick run

The model: `PI0ForConditionalGeneration` at transformers' published configuration (`published_pi0_config`:
PaliGemma = Gemma-2B text model, width 2048, 18 layers, vocabulary 257,152 + SigLIP so400m; action expert
Gemma-300M, width 1024; 3.50 B parameters, 7.00 GB in bf16) with RANDOM weights (transformers' own init, normal
std 0.02), in bf16: built on the meta device, then allocated and initialized in place, tensor by tensor, so no fp32
copy ever exists. `--scale` multiplies every width and the vocabulary (depth kept) for quick runs.

Plans, over the layers the default PlanTemplate quantizes (vision tower, language model, action expert; the
projector and the action head stay bf16): uniform RTN W8 and W4, and "mixed4": the real allocator
(`qvla_quant.allocation`, optimal solver) at a 4.0-bit budget over {2, 4, 8, 16} on a SYNTHETIC sensitivity
(s_c(b) = g_c 4^-b, g_c log-normal per row and scaled per role): a memory and speed figure, not an accuracy one.
Every plan comes in three embedding variants: "bf16 tables" (both token tables stored as before), and "packed
tables" (the VLM's table at --embedding-bits, the action expert's table, which π0 never reads, not stored) at
8 and at 4 bits.

Sizes of every variant come from the byte formulas (`qvla_quant.packed`, `qvla_quant.packed_embedding`; exact:
the measured artifacts match them up to the safetensors header and the non-persistent buffers). Each variant in
--measure is really quantized, saved and loaded, each step in its own subprocess so that every peak RSS
(`ru_maxrss`) is that step's own: the quantization peak (high-water mark of a process that built the float model
and ran `quantize_model` in place) and its excess over the float model; RSS after `qvla_quant.load` (safetensors
maps the file: pages come in as the forward touches them); resident memory after the forwards (packed buffers,
activations and the kernels' resident layouts, `PackedLinear.kernel_layout_bytes`). Latency: one action chunk
(`sample_actions`, the checkpoint's 10 denoising steps) on one sample with --cameras camera images of 224 px and a
--text-len token instruction, cold (first call: the kernels build their layouts) and warm (second call).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# measurements


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's RSS high-water mark since the last `reset_peak` (VmHWM). Not `ru_maxrss`: Linux carries the
    parent's mark over fork + exec into it, so every phase would report at least the parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0; where /proc/self/clear_refs is not writable the mark keeps
    counting from the process start, so a phase's peak includes the steps before it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build_float(scale: float, seed: int = 0):
    """The bf16 model with random weights, built without any fp32 copy: meta skeleton -> bf16 -> allocated
    uninitialized on the CPU -> transformers' init in place (its rotary, time-embedding and position buffers too)."""
    from transformers import PI0ForConditionalGeneration

    from qvla_quant.adapters.pi0 import Pi0Adapter, published_pi0_config

    with torch.device("meta"):
        model = PI0ForConditionalGeneration(published_pi0_config(scale))
    model.to(torch.bfloat16)
    model.to_empty(device="cpu")  # pages are committed as the init below writes them
    torch.manual_seed(seed)
    model.initialize_weights()
    return Pi0Adapter(model.eval())


def build_meta(scale: float):
    from transformers import PI0ForConditionalGeneration

    from qvla_quant.adapters.pi0 import Pi0Adapter, published_pi0_config

    with torch.device("meta"):
        model = PI0ForConditionalGeneration(published_pi0_config(scale))
    return Pi0Adapter(model.to(torch.bfloat16).eval())


def batch_for(adapter, cameras: int, text_len: int):
    from qvla_quant.adapters.pi0 import example_batch

    return example_batch(adapter.model.config, 1, n_cameras=cameras, text_len=text_len, seed=0)


def time_chunks(adapter, batch, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        adapter.predict(batch)
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------------------------
# plans


def quantized_layers(adapter):
    from qvla_quant.roles import PlanTemplate

    template = PlanTemplate()
    return [i for i in adapter.layers() if template.rule_for(i.name, i.role) == "auto"]


def mixed_plan(layers, budget: float = 4.0, seed: int = 0):
    """The allocator on a synthetic sensitivity: s_c(b) = g_c 4^-b e_cb with g_c = K_c * role factor * exp(2 N(0, 1))
    (rows that differ by orders of magnitude, as measured ones do) and e_cb = exp(0.3 N(0, 1)) (bit-to-bit noise)."""
    from qvla_quant.allocation import AllocationProblem, solve
    from qvla_quant.baselines import RTN_WEIGHT
    from qvla_quant.config import AllocationConfig, QuantConfig
    from qvla_quant.plan import LayerPlan, Plan

    bits = (2, 4, 8, 16)
    factor = {"vision": 0.5, "language": 1.0, "action": 4.0}  # the expert writes the actions: more sensitive
    gen = torch.Generator().manual_seed(seed)
    cols = torch.tensor([4.0**-b for b in bits[:-1]] + [0.0], dtype=torch.float64)
    tables = []
    for info in layers:
        g = (2 * torch.randn(info.out_features, generator=gen, dtype=torch.float64)).exp() * info.fan_in
        noise = (0.3 * torch.randn(info.out_features, len(bits), generator=gen, dtype=torch.float64)).exp()
        tables.append((info.desc(), (g * factor.get(info.role, 1.0))[:, None] * cols * noise))
    config = AllocationConfig(bits=(2, 4, 8), solver="lagrangian")  # the optimal solver (default: greedy)
    problem = AllocationProblem.from_tables(tables, bits, budget, config)
    result = solve(problem)
    plans, start = {}, 0
    for meta in problem.layers:
        rows = result.bits[start : start + meta.out_features].tolist()
        start += meta.out_features
        plans[meta.name] = LayerPlan(meta.name, meta.role, meta.kind, meta.out_features, meta.fan_in, rows)
    return Plan(plans, quant=QuantConfig(weight=RTN_WEIGHT), budget=budget, method="qvla-synthetic-sensitivity",
                info={"note": "synthetic sensitivity: a memory/speed figure, not an accuracy one"})  # fmt: skip


def make_plans(adapter) -> dict:
    from qvla_quant.baselines import uniform_plan

    layers = quantized_layers(adapter)
    return {"W8": uniform_plan(layers, 8), "W4": uniform_plan(layers, 4), "mixed4": mixed_plan(layers)}


def with_tables(adapter, plan, embedding_bits: int | None):
    """`plan` with π0's tables packed (VLM table at `embedding_bits`, the unused expert table dropped), or as is."""
    if embedding_bits is None:
        return plan
    return dataclasses.replace(plan, embeddings=adapter.embedding_plans(embedding_bits))


def predicted_sizes(adapter, plan) -> dict:
    """Bytes of every tensor the artifact of `plan` holds, from the formulas (no weights needed)."""
    from qvla_quant.packed import overhead_bits_per_weight, plan_weight_bytes
    from qvla_quant.packed_embedding import predicted_embedding_bytes

    model = adapter.model
    dtype = torch.bfloat16
    params = dict(model.named_parameters())
    planned_weights = {f"{n}.weight" for n in plan.layers}
    tables = {f"{n}.weight" for n in plan.embeddings}
    others = sum(p.numel() * p.element_size() for n, p in params.items() if n not in planned_weights | tables)
    layers = plan_weight_bytes(plan, dtype)
    embeddings = sum(predicted_embedding_bytes(ep, dtype) for ep in plan.embeddings.values())
    n_weights = sum(lp.n_weights for lp in plan.layers.values())
    all_tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)} & set(params)
    float_tables = sum(params[n].numel() * params[n].element_size() for n in all_tables - tables)
    return {
        "bf16": sum(p.numel() * p.element_size() for p in params.values()),
        "artifact": others + layers + embeddings,
        "layers_bf16": 2 * n_weights,
        "layers": layers,
        "average_bits": plan.average_bits(),
        "stored_bits": 8.0 * layers / n_weights,
        "overhead_bits": overhead_bits_per_weight(plan, dtype),
        "tables": embeddings + float_tables,  # every token / position table as stored
    }


# ---------------------------------------------------------------------------------------------------------------
# phases (each runs in its own process)


def phase_float(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    adapter = build_float(args.scale)
    build_s, after_build, build_peak = time.perf_counter() - t0, rss(), peak_rss()
    batch = batch_for(adapter, args.cameras, args.text_len)
    reset_peak()
    times = time_chunks(adapter, batch, args.chunks)
    return {"build_s": build_s, "rss_built": after_build, "build_peak": build_peak, "rss_forward": rss(),
            "forward_peak": peak_rss(), "chunk_s": times}  # fmt: skip


def phase_quantize(args) -> dict:
    from qvla_quant.api import save
    from qvla_quant.plan import Plan
    from qvla_quant.transforms import quantize_model

    torch.set_num_threads(args.threads)
    plan = Plan.from_json(Path(args.plan).read_text())
    adapter = build_float(args.scale)
    before, build_peak = rss(), peak_rss()
    reset_peak()
    t0 = time.perf_counter()
    quantize_model(adapter.model, plan)
    quant_s, quant_peak, after = time.perf_counter() - t0, peak_rss(), rss()
    reset_peak()
    t0 = time.perf_counter()
    save(args.artifact, adapter, plan)
    return {"rss_float": before, "build_peak": build_peak, "quant_peak": quant_peak, "quant_s": quant_s,
            "rss_quantized": after, "save_s": time.perf_counter() - t0, "save_peak": peak_rss(),
            "file_bytes": (Path(args.artifact) / "model.safetensors").stat().st_size}  # fmt: skip


def phase_load(args) -> dict:
    from qvla_quant import kernels
    from qvla_quant.api import load
    from qvla_quant.transforms import packed_layers

    torch.set_num_threads(args.threads)
    from transformers import PI0ForConditionalGeneration  # noqa: F401 - its code is not what loading costs

    base = rss()
    t0 = time.perf_counter()
    adapter = load(args.artifact)
    load_s, after_load, load_peak = time.perf_counter() - t0, rss(), peak_rss()
    batch = batch_for(adapter, args.cameras, args.text_len)
    reset_peak()
    times = time_chunks(adapter, batch, args.chunks)
    layout = sum(m.kernel_layout_bytes() for _, m in packed_layers(adapter.model))
    return {"rss_base": base, "load_s": load_s, "rss_loaded": after_load, "load_peak": load_peak,
            "rss_forward": rss(), "forward_peak": peak_rss(), "chunk_s": times, "kernel_layout_bytes": layout,
            "kernel_mode": kernels.kernel_mode()}  # fmt: skip


PHASES = {"float": phase_float, "quantize": phase_quantize, "load": phase_load}


def run_phase(args, phase: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--scale", str(args.scale), "--threads", str(args.threads),
           "--cameras", str(args.cameras), "--text-len", str(args.text_len), "--chunks", str(args.chunks)]  # fmt: skip
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    print(f"  [{phase} {extra.get('artifact', '')}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="width and vocabulary multiplier (1: published size)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in every phase")
    p.add_argument("--cameras", type=int, default=1, help="camera images per sample (224 px: 256 tokens each)")
    p.add_argument("--text-len", type=int, default=16, help="instruction tokens")
    p.add_argument("--chunks", type=int, default=2, help="action chunks timed per model (the first one is cold)")
    p.add_argument("--embedding-bits", type=int, default=4, help="bits of the VLM token table in 'packed tables'")
    p.add_argument(
        "--measure",
        default="W4:packed",
        help="variants quantized, saved, loaded and timed: comma-separated PLAN:TABLES with PLAN in "
        "W8, W4, mixed4 and TABLES 'packed' or 'bf16' (default W4:packed; '' for formulas only)",
    )
    p.add_argument("--no-float", action="store_true", help="skip the bf16 latency / memory phase")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_full_pi0"), help="work directory (artifacts, plans)")
    p.add_argument("--keep", action="store_true", help="keep the artifacts (they are removed after measuring)")
    p.add_argument("--json", help="write every number here as JSON")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = build_meta(args.scale)
    base_plans = make_plans(meta)
    variants = {}
    for name, plan in base_plans.items():
        variants[(name, "bf16")] = plan
        variants[(name, "packed8")] = with_tables(meta, plan, 8)
        variants[(name, f"packed{args.embedding_bits}")] = with_tables(meta, plan, args.embedding_bits)
    sizes = {k: predicted_sizes(meta, v) for k, v in variants.items()}
    bf16 = next(iter(sizes.values()))["bf16"]
    report = {"args": vars(args), "bf16_bytes": bf16, "sizes": {f"{a}:{b}": s for (a, b), s in sizes.items()}}
    print(f"π0 at scale {args.scale}: {bf16 / GB:.3f} GB in bf16, "
          f"{sum(1 for _ in quantized_layers(meta))} quantized layers; "
          f"formulas in {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    if not args.no_float:
        report["float"] = run_phase(args, "float")
    measured = {}
    for item in filter(None, (s.strip() for s in args.measure.split(","))):
        plan_name, _, tables = item.partition(":")
        key = (plan_name, "bf16" if tables == "bf16" else f"packed{args.embedding_bits}")
        plan = variants[key]
        plan_path = out / f"plan_{plan_name}_{key[1]}.json"
        plan_path.write_text(plan.to_json())
        artifact = out / f"artifact_{plan_name}_{key[1]}"
        q = run_phase(args, "quantize", plan=plan_path, artifact=artifact)
        ld = run_phase(args, "load", artifact=artifact)
        from qvla_quant.artifact import artifact_summary

        summary = artifact_summary(artifact)
        measured[f"{plan_name}:{key[1]}"] = {"quantize": q, "load": ld, "summary": {
            k: summary.get(k) for k in ("quantized_weight_bytes_after", "quantized_weight_bytes_planned",
                                        "average_bits", "average_bits_stored", "overhead_bits_per_weight",
                                        "parameter_bytes_after", "embedding_bytes_after")}}  # fmt: skip
        if not args.keep:
            shutil.rmtree(artifact)
    report["measured"] = measured
    report["total_s"] = time.perf_counter() - t_start
    print_report(report, sizes, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


def print_report(report: dict, sizes: dict, args) -> None:
    bf16 = report["bf16_bytes"]
    eb = args.embedding_bits
    print(f"\nπ0 (published configuration x {args.scale}), random bf16 weights; RTN plans, mixed4 = allocator on a "
          "SYNTHETIC sensitivity (memory/speed figure, not accuracy)")  # fmt: skip
    print(f"bf16 model: {bf16 / GB:.3f} GB\n")
    print("artifact size (formula)       | bf16 tables        | tables int8, expert dropped | "
          f"tables int{eb}, expert dropped")  # fmt: skip
    for name in ("W8", "W4", "mixed4"):
        cells = []
        for tables in ("bf16", "packed8", f"packed{eb}"):
            s = sizes[(name, tables)]["artifact"]
            cells.append(f"{s / GB:6.3f} GB {100 * s / bf16:5.1f}%")
        print(f"{name:<30}| {cells[0]:<19}| {cells[1]:<28}| {cells[2]}")
    print("\nquantized layers (formula): average bits b, stored bits per weight, b + documented overhead, "
          "bytes / bf16 vs (b + overhead) / 16")  # fmt: skip
    for name in ("W8", "W4", "mixed4"):
        s = sizes[(name, "bf16")]
        ratio, target = s["layers"] / s["layers_bf16"], (s["average_bits"] + s["overhead_bits"]) / 16
        print(f"  {name:<7} b = {s['average_bits']:.4f}  stored {s['stored_bits']:.4f}  b + overhead "
              f"{s['average_bits'] + s['overhead_bits']:.4f} ({s['overhead_bits']:.4f} = 72 bits per quantized row / "
              f"K, 32 per kept row)  {100 * ratio:.2f}% of bf16 vs {100 * target:.2f}% (b/16 {100 * s['average_bits'] / 16:.2f}%)")  # noqa: E501  # fmt: skip
    if "float" in report:
        f = report["float"]
        print(f"\nbf16: built in {f['build_s']:.0f} s, RSS {f['rss_built'] / GB:.2f} GB built (peak "
              f"{f['build_peak'] / GB:.2f}), {f['rss_forward'] / GB:.2f} GB after the forwards (peak "
              f"{f['forward_peak'] / GB:.2f}); chunk "
              + " / ".join(f"{t:.2f} s" for t in f["chunk_s"]) + " (cold / warm)")  # fmt: skip
    for key, m in report["measured"].items():
        q, ld, sm = m["quantize"], m["load"], m["summary"]
        plan_name, tables = key.split(":")
        predicted = sizes[(plan_name, tables)]["artifact"]
        print(f"\n{key}: model.safetensors {q['file_bytes'] / GB:.3f} GB ({100 * q['file_bytes'] / bf16:.1f}% of bf16; "
              f"formula {predicted / GB:.3f} GB), layers stored at {sm['average_bits_stored']:.4f} bits/weight "
              f"(plan {sm['average_bits']:.4f})")  # noqa: E501  # fmt: skip
        print(
            f"  quantize: float model RSS {q['rss_float'] / GB:.2f} GB, peak {q['quant_peak'] / GB:.2f} GB "
            f"(+{(q['quant_peak'] - q['rss_float']) / GB:.2f} GB), {q['quant_s']:.0f} s; after "
            f"{q['rss_quantized'] / GB:.2f} GB; save {q['save_s']:.0f} s (peak {q['save_peak'] / GB:.2f} GB)"
        )
        print(f"  load: {ld['load_s']:.1f} s, RSS {ld['rss_loaded'] / GB:.2f} GB after load (peak "
              f"{ld['load_peak'] / GB:.2f}; process before {ld['rss_base'] / GB:.2f}), {ld['rss_forward'] / GB:.2f} GB "
              f"after the forwards (peak {ld['forward_peak'] / GB:.2f}; kernel layouts "
              f"{ld['kernel_layout_bytes'] / GB:.2f} GB, kernels {ld['kernel_mode']!r}); chunk "
              + " / ".join(f"{t:.2f} s" for t in ld["chunk_s"]) + " (cold / warm)")  # fmt: skip
    print(f"\n{args.threads} thread(s), {args.cameras} camera(s) x 256 tokens + {args.text_len} text tokens, batch 1; "
          f"total {report['total_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
