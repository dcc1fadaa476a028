"""`qvla-quant`: calibrate / allocate / apply / inspect from the command line.

    qvla-quant calibrate --policy CKPT --data DATA --out SENS [--budget-free options]   sensitivities (resumable)
    qvla-quant allocate  --sensitivity SENS --budget 4 --out plan.json                   bits per row
    qvla-quant apply     --policy CKPT --plan plan.json --out ARTIFACT                    packed artifact
    qvla-quant inspect   ARTIFACT | plan.json | SENS [--plots DIR]                        summary table (+ plots)
    qvla-quant baseline  --method {rtn,awq,gptq,smoothquant,module} --policy CKPT [--data DATA] --bits 4 --out A

Calibration data (--data): a safetensors file holding one batch of model inputs, or a directory of such files
(read in name order, one batch per file). Tensor names are the policy's input names with the samples in dimension 0;
for π0 that is input_ids, attention_mask, pixel_values [B, cameras, 3, S, S], pixel_attention_mask and state (see
`qvla_quant.adapters.pi0`). `--batch-size` re-splits the samples into batches of that size.

Bad flags, paths or inputs end with one line `qvla-quant: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qvla_quant.allocation import BudgetError
from qvla_quant.api import allocate, calibrate, load_policy, quantize, save, with_embeddings
from qvla_quant.artifact import artifact_layer_dtypes, artifact_summary, read_plan
from qvla_quant.checkpoint import check_checkpoint_dir
from qvla_quant.config import (
    ACTIVATION_BITS,
    METHODS,
    PROXIES,
    SOLVERS,
    AllocationConfig,
    CalibrationConfig,
    WeightQuantConfig,
)
from qvla_quant.files import CONFIG_FILE, is_artifact
from qvla_quant.llm_baselines import parse_bits_arg, run_baseline
from qvla_quant.packed import PACKED_FORMAT_VERSION
from qvla_quant.plan import EMBEDDING_BITS, Plan
from qvla_quant.quantizer import GROUP_SIZES, ROW_BITS
from qvla_quant.report import format_table, human_bytes, plot_plan, plot_sensitivity, stored_bytes_lines, summary_rows
from qvla_quant.roles import PlanTemplate
from qvla_quant.sensitivity import CalibrationError
from qvla_quant.sensitivity_store import Sensitivity

PROG = "qvla-quant"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would print the whole usage first)
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a comma-separated list from {ROW_BITS}, got {text!r}") from None
    if not bits or set(bits) - set(ROW_BITS):
        raise argparse.ArgumentTypeError(f"bits must be a comma-separated list from {ROW_BITS}, got {text!r}")
    return bits


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# data
def load_batches(path, batch_size: int | None = None, max_batches: int | None = None) -> list[dict]:
    """Model-input batches from a safetensors file or a directory of them (see the module docstring)."""

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"calibration data directory {str(path)!r} holds no *.safetensors files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"calibration data {str(path)!r} does not exist")
    batches = []
    for f in files:
        try:
            batches.append(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
        if not batches[-1]:
            raise ValueError(f"{f} holds no tensors")
    if batch_size is not None:
        keys = set(batches[0])
        if any(set(b) != keys for b in batches):
            raise ValueError(f"the files in {path} hold different tensor names; every batch needs the same inputs")
        merged = {k: torch.cat([b[k] for b in batches]) for k in keys}
        n = next(iter(merged.values())).shape[0]
        batches = [{k: v[i : i + batch_size] for k, v in merged.items()} for i in range(0, n, batch_size)]
    return batches[:max_batches] if max_batches else batches


def save_batches(directory, batches) -> list[Path]:
    """Write batches in the --data format (one file per batch); returns the files."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, batch in enumerate(batches):
        f = directory / f"batch_{i:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, str(f))
        files.append(f)
    return files


# ---------------------------------------------------------------------------------------------------------------
# commands
def _check_policy_path(args) -> None:
    """Refuse a missing or damaged checkpoint before any expensive step, naming the file."""

    path = Path(args.policy)
    if not path.exists():
        raise FileNotFoundError(f"policy checkpoint {args.policy!r} does not exist")
    if not path.is_dir() or is_artifact(path):
        return  # an artifact is validated by its loader
    config = path / CONFIG_FILE
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{config} is not valid JSON ({' '.join(str(e).split())}): the checkpoint's config is "
                "damaged; copy the checkpoint again"
            ) from None
    check_checkpoint_dir(path)  # pickle weights, an artifact without artifact.json, unreadable safetensors


def _load_policy(args):

    kwargs = {"device": args.device}
    if getattr(args, "action_dim", None):
        kwargs["action_dim"] = args.action_dim
    return load_policy(args.policy, **kwargs)


def _template(path):

    if path is None:
        return None
    try:
        return PlanTemplate.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"template file {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"template file {path!r} is not valid JSON ({e})") from None


def cmd_calibrate(args) -> int:

    _check_policy_path(args)
    batches = load_batches(args.data, args.batch_size, args.max_batches)
    config = CalibrationConfig(
        bits=args.bits,
        method=args.method,
        proxy=args.proxy,
        exact_fraction=args.exact_fraction,
        rank_sample=args.rank_sample,
        channels_per_pass=args.channels_per_pass,
        max_exact_dims=args.max_exact_dims,
        n_probes=args.n_probes,
        seed=args.seed,
        weight=WeightQuantConfig(clip_search=not args.no_clip_search),
        template=_template(args.template) or PlanTemplate(),
        store_dir=str(args.out),
        progress=not args.quiet,
        group_size=args.group_size,
    )
    adapter = _load_policy(args)
    t0 = time.perf_counter()
    sens = calibrate(adapter, batches, config)
    r = sens.report
    print(f"calibrated {r['n_channels']:,} channels in {r['n_layers']} layers on {r['n_samples']} samples "
          f"in {time.perf_counter() - t0:.1f} s (this run) -> {args.out}")  # fmt: skip
    print(f"dead layers ({len(sens.dead_layers)}): {', '.join(sens.dead_layers) or '-'}")
    for key, v in (r.get("rank_correlation") or {}).items():
        per_bit = ", ".join(f"{b}b {v[str(b)]:.3f}" for b in sens.bits if str(b) in v)
        print(f"spearman(exact, {key} proxy) on {v['n']} sampled channels: {v['all']:.3f} ({per_bit})")
    if args.plots:
        print(f"plot: {plot_sensitivity(sens, args.plots)}")
    return 0


def cmd_allocate(args) -> int:

    sens = Sensitivity.load(args.sensitivity)
    config = AllocationConfig(
        bits=args.bits,
        solver=args.solver,
        max_pruned_fraction=args.max_pruned_fraction,
        prune_threshold=args.prune_threshold,
        prune_abs_threshold=args.prune_abs_threshold,
        prune_rel_threshold=args.prune_rel_threshold,
        activation_bits=args.activation_bits,
        template=_template(args.template),
        groups=not args.no_groups,
    )
    plan = allocate(sens, args.budget, config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(plan.to_json() + "\n")
    a = plan.info["allocation"]
    dtype = getattr(torch, (sens.adapter_config or {}).get("dtype", "float32"))
    rows = summary_rows(plan, dtype)
    print(format_table(rows))
    print(
        f"{plan.method}: {a['average_bits']:.4f} bits/weight (+{rows[-1]['overhead_bits']:.4f} per-row overhead as "
        f"stored from {str(dtype).removeprefix('torch.')}) for budget {args.budget:g}; total action error "
        f"{a['total_error']:.4e}, lower bound {a['lower_bound']:.4e} (gap {a['relative_gap']:.3f}) -> {out}"
    )
    if args.plots:
        print("plots: " + ", ".join(str(p) for p in plot_plan(plan, args.plots)))
    return 0


def _read_plan_file(path) -> Plan:
    try:
        return Plan.from_json(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a plan JSON written by allocate ({e})") from None


def cmd_apply(args) -> int:

    _check_policy_path(args)
    plan = _read_plan_file(args.plan)
    adapter = _load_policy(args)
    dtype = adapter.dtype
    if args.embedding_bits is not None:
        plan = with_embeddings(plan, adapter, args.embedding_bits)
    quantize(adapter, plan, check_source=not args.ignore_source)
    path = save(args.out, adapter, plan)
    summary = artifact_summary(path)
    print(format_table(summary_rows(plan, dtype)))
    print("\n".join(stored_bytes_lines(summary)))
    print(
        f"measured packed weights: {human_bytes(summary['quantized_weight_bytes_before'])} -> "
        f"{human_bytes(summary['quantized_weight_bytes_after'])}; all parameters "
        f"{human_bytes(summary['parameter_bytes_before'])} -> {human_bytes(summary['parameter_bytes_after'])} -> {path}"
    )
    return 0


def cmd_baseline(args) -> int:
    """An LLM-derived baseline (`qvla_quant.llm_baselines`: rtn, awq, gptq, smoothquant, module) as an artifact."""

    _check_policy_path(args)
    bits, role_bits = parse_bits_arg(args.method, args.bits)
    if args.method in ("awq", "gptq", "smoothquant") and not args.data:
        raise ValueError(f"--method {args.method} calibrates on model-input batches: pass --data")
    batches = load_batches(args.data, args.batch_size, args.max_batches) if args.data else None
    kwargs = {"template": _template(args.template)}
    if args.group_size is not None:
        if args.method != "gptq":
            raise ValueError("--group-size is a GPTQ setting (grouped scales); leave it out for other methods")
        kwargs["group_size"] = args.group_size
    adapter = _load_policy(args)
    t0 = time.perf_counter()
    res = run_baseline(args.method, adapter, batches, bits=bits, role_bits=role_bits, **kwargs)
    seconds = time.perf_counter() - t0
    path = res.save(args.out)
    summary = artifact_summary(path)
    print(format_table(summary_rows(res.plan, getattr(adapter, "dtype", torch.float32))))
    print("\n".join(stored_bytes_lines(summary)))
    print(f"{res.plan.method}: {res.plan.average_bits():.4f} bits/weight, calibrated in {seconds:.1f} s -> {path}")
    return 0


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if is_artifact(path):
        summary = artifact_summary(path)
        plan = read_plan(path)
        dtypes = {name: getattr(torch, d) for name, d in artifact_layer_dtypes(path).items()}
        print(f"artifact {path} (format {summary['format_version']}, adapter {summary.get('adapter')}, plan "
              f"{summary['plan_hash']}, {plan.method}, budget {plan.budget})")  # fmt: skip
        print(format_table(summary_rows(plan, dtypes, packed_version=summary["packed_format_version"])))
        print("\n".join(stored_bytes_lines(summary)))
    elif (path / "index.json").is_file():
        sens = Sensitivity.load(path)
        r = sens.report
        print(f"sensitivity store {path}: {r.get('n_channels')} channels, {len(sens.layers)} layers, bits "
              f"{list(sens.bits)}, method {r.get('method')}, proxy {sens.proxy}")  # fmt: skip
        print(f"dead layers: {', '.join(sens.dead_layers) or '-'}")
        for key, v in (r.get("rank_correlation") or {}).items():
            print(f"spearman(exact, {key} proxy): {v['all']:.3f} on {v['n']} sampled channels")
        if args.plots:
            print(f"plot: {plot_sensitivity(sens, args.plots)}")
        return 0
    elif path.is_file():
        plan = _read_plan_file(path)

        print(f"plan {path} ({plan.method}, budget {plan.budget}, weights counted as {args.dtype}, bytes as packed "
              f"layout {PACKED_FORMAT_VERSION} stores them)")  # fmt: skip
        print(format_table(summary_rows(plan, getattr(torch, args.dtype))))
    else:
        raise FileNotFoundError(f"{str(path)!r} is neither an artifact directory, a sensitivity store nor a plan file")
    if args.plots:
        print("plots: " + ", ".join(str(p) for p in plot_plan(plan, args.plots)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="QVLA: action-aware per-channel mixed-precision quantization of VLA policies"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cal, alloc = CalibrationConfig(), AllocationConfig()  # the defaults and choices below are theirs
    c = sub.add_parser("calibrate", help="measure per-channel action-space sensitivities (resumable)")
    c.add_argument("--policy", required=True, help="local checkpoint directory (e.g. a π0 saved by transformers)")
    c.add_argument("--data", required=True, help="safetensors file or directory of model-input batches")
    c.add_argument("--out", required=True, help="sensitivity store directory (an unfinished one is resumed)")
    c.add_argument("--method", choices=METHODS, default=cal.method)
    c.add_argument("--proxy", choices=PROXIES, default=cal.proxy)
    c.add_argument(
        "--exact-fraction", type=float, default=cal.exact_fraction, help="two_stage: share refined exactly per bit"
    )
    c.add_argument(
        "--rank-sample", type=int, default=cal.rank_sample, help="random channels measured exactly for the report"
    )
    c.add_argument("--channels-per-pass", type=int, default=cal.channels_per_pass)
    c.add_argument("--max-exact-dims", type=int, default=cal.max_exact_dims)
    c.add_argument("--n-probes", type=int, default=cal.n_probes)
    c.add_argument(
        "--bits", type=_bits, default=cal.bits, help=f"bit-widths measured per channel, from {list(ROW_BITS)}"
    )
    c.add_argument("--seed", type=int, default=cal.seed)
    c.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=cal.group_size,
        help="also measure the calibrated widths in 2/3/4 bits with group-wise scales (one scale and zero "
        "per this many weights along K), for allocate to choose per row (default: per-row scales only)",
    )
    c.add_argument("--template", help="PlanTemplate JSON ({'roles': {...}, 'names': {...}})")
    c.add_argument("--no-clip-search", action="store_true", help="plain min-max ranges (no MSE clip search)")
    c.add_argument("--batch-size", type=int, help="re-split the samples into batches of this size")
    c.add_argument("--max-batches", type=int)
    c.add_argument("--action-dim", type=int, help="action dims the robot uses (π0: the rest is padding)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--plots", help="write sensitivity_map.png here")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser("allocate", help="allocate bits per row under an average-bit budget")
    a.add_argument("--sensitivity", required=True, help="sensitivity store directory from calibrate")
    a.add_argument("--budget", required=True, type=_positive_float, help="average bits per weight")
    a.add_argument("--out", required=True, help="plan JSON to write")
    a.add_argument("--solver", choices=SOLVERS, default=alloc.solver)
    a.add_argument("--bits", type=_bits, default=alloc.bits, help="candidate bit-widths, e.g. 2,4,8,16")
    a.add_argument("--max-pruned-fraction", type=float, default=alloc.max_pruned_fraction)
    a.add_argument("--prune-threshold", type=float, help="never prune a channel whose s(0) is above this")
    a.add_argument("--prune-abs-threshold", type=float, help="the same (the dual-threshold guard's absolute part)")
    a.add_argument(
        "--prune-rel-threshold",
        type=float,
        help="never prune a channel whose s(0) is above this times its layer's median s(0)",
    )
    a.add_argument("--activation-bits", type=int, choices=ACTIVATION_BITS, default=alloc.activation_bits)
    a.add_argument(
        "--no-groups",
        action="store_true",
        help="per-row choices only, even if the sensitivity was calibrated with --group-size",
    )
    a.add_argument("--template", help="PlanTemplate JSON overriding the calibrated one")
    a.add_argument("--plots", help="write bit_histogram.png and layer_bits.png here")
    a.set_defaults(func=cmd_allocate)

    p = sub.add_parser("apply", help="quantize a checkpoint with a plan and save the packed artifact")
    p.add_argument("--policy", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True, help="artifact directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--action-dim", type=int)
    p.add_argument("--ignore-source", action="store_true", help="apply a plan made for another checkpoint")
    p.add_argument(
        "--embedding-bits",
        type=int,
        choices=[b for b in EMBEDDING_BITS if b],
        help="also store the token-embedding table at this many bits per value (π0: the VLM's table; the action "
        "expert's, which sampling never reads, is then not stored); default: tables stay float",
    )
    p.set_defaults(func=cmd_apply)

    b = sub.add_parser(
        "baseline",
        help="an LLM-derived baseline (RTN, AWQ, GPTQ, SmoothQuant, module-wise) as an "
        "artifact, on the same calibration batches",
    )
    b.add_argument("--method", required=True, choices=("rtn", "awq", "gptq", "smoothquant", "module"))
    b.add_argument("--policy", required=True)
    b.add_argument("--data", help="model-input batches (as for calibrate); needed by awq, gptq and smoothquant")
    b.add_argument("--out", required=True, help="artifact directory")
    b.add_argument(
        "--bits",
        help="weight bits (default 4; smoothquant 8), or for --method module per role, e.g. "
        "vision=4,language=8,action=8 (the default)",
    )
    b.add_argument("--group-size", type=int, help="gptq: one scale/zero per this many columns (grouped rows)")
    b.add_argument("--template", help="PlanTemplate JSON: which layers are quantized (default: the paper's)")
    b.add_argument("--batch-size", type=int)
    b.add_argument("--max-batches", type=int)
    b.add_argument("--action-dim", type=int)
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_baseline)

    i = sub.add_parser("inspect", help="summary table of an artifact, a plan file or a sensitivity store")
    i.add_argument("path")
    i.add_argument("--dtype", default="bfloat16", help="source dtype a bare plan's bytes are counted in")
    i.add_argument("--plots", help="write plots here")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:

    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", None) and not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        print(f"{PROG}: error: --dtype {args.dtype!r} is not a torch dtype name (e.g. bfloat16)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (BudgetError, CalibrationError, ValueError, OSError, KeyError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception put in it
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a calibration resumes from its store when run again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
