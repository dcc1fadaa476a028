"""Per-layer CPU speed of the packed kernels against full precision and peer libraries; prints one table.

    PYTHONPATH=src .venv/bin/python bench/bench_kernels.py                 # 4 shapes x batch 1 and 16
    PYTHONPATH=src .venv/bin/python bench/bench_kernels.py --quick         # 1024x1024 and 2048x8192, batch 1

Shapes are out x in (nn.Linear(in, out)). Per shape and batch (tokens):
    fp32 / bf16        nn.Linear in that dtype (the baselines)
    W8, W4, W4g128     every row at 8 / 4 bits (W4g128: 4 bits with group-wise scales, g = 128)
    mixed              per-row bits 0/2/3/4/6/8/16 at 5/15/10/40/10/15/5 % (4.8 bits on average)
    ... ref            the packed layer's reference path (QVLA_KERNELS=reference: blocked fp32 dequantization)
    ... cpu            the CPU fast path (`qvla_quant.kernels.cpu`)
    torchao int8       torchao Int8WeightOnlyConfig on a bf16 copy (if torchao is installed; its CPU int4 is gone)
    quanto int8/int4   optimum-quanto qint8 / qint4 weights on the fp32 layer, frozen (if installed)
Columns: median and best time over 5 interleaved rounds (torch.utils.benchmark blocked_autorange each; every
variant of a shape and batch is timed in every round, so a load spike of the shared machine hits all of them),
speed-up over fp32 and bf16 nn.Linear (medians), error
(max |y - ref| / max |ref|, ref = the fp32 nn.Linear for the baselines and peers, the packed layer's exact output
for packed rows), and the resident bytes of the weights (packed buffers + the CPU layout for "cpu" rows).

The machine is shared (other jobs run beside it): the header prints the load average before and after; repeat a run
and compare before trusting a single number.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import warnings

import torch
from torch import nn
from torch.utils import benchmark

from qvla_quant.config import QuantConfig, WeightQuantConfig
from qvla_quant.kernels import cpu as cpu_kernels
from qvla_quant.kernels.reference import max_relative_error, reference_output
from qvla_quant.packed import PackedLinear

SHAPES = ((1024, 1024), (2048, 2048), (2048, 8192), (8192, 2048))
BATCHES = (1, 16)
CONFIG = QuantConfig(weight=WeightQuantConfig(clip_search=False))  # clipping changes values, not the runtime
MIXED = {0: 0.05, 2: 0.15, 3: 0.10, 4: 0.40, 6: 0.10, 8: 0.15, 16: 0.05}


def mixed_bits(out: int, seed: int = 0) -> torch.Tensor:
    counts = {b: round(f * out) for b, f in MIXED.items()}
    counts[4] += out - sum(counts.values())
    bits = torch.cat([torch.full((n,), b) for b, n in counts.items()])
    return bits[torch.randperm(out, generator=torch.Generator().manual_seed(seed))]


def timed_rounds(fns: dict[str, object], min_time: float, rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (median, best)} in microseconds: every fn is timed in each of `rounds` interleaved rounds (a load
    spike on a shared machine then hits all variants alike instead of one), each round a blocked_autorange of
    min_time / rounds seconds; the median and the best over rounds of each round's median."""
    per: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                per[name].append(t.blocked_autorange(min_run_time=min_time / rounds).median * 1e6)
    return {name: (statistics.median(v), min(v)) for name, v in per.items()}


def packed_bytes(layer: PackedLinear) -> int:
    return layer.weight_bytes() + layer.bias_bytes()


def peers(lin: nn.Linear) -> list[tuple[str, object, str]]:
    """(name, module or None, note) for the peer libraries that are installed."""
    out: list[tuple[str, object, str]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            m = nn.Sequential(copy.deepcopy(lin)).bfloat16()
            quantize_(m, Int8WeightOnlyConfig())
            out.append(("torchao int8 (bf16 act.)", m, ""))
            out.append(("torchao int4", None, "not on CPU in this torchao (no CPU int4 packing format)"))
    except Exception as e:  # noqa: BLE001 - a peer that fails to import or quantize is reported, not fatal
        out.append(("torchao", None, f"not available: {type(e).__name__}: {str(e)[:60]}"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from optimum.quanto import freeze, qint4, qint8, quantize

            for name, q in (("quanto int8", qint8), ("quanto int4", qint4)):
                m = nn.Sequential(copy.deepcopy(lin))
                quantize(m, weights=q)
                freeze(m)
                out.append((name, m, ""))
    except Exception as e:  # noqa: BLE001
        out.append(("optimum-quanto", None, f"not available: {type(e).__name__}: {str(e)[:60]}"))
    return out


def run_shape(out_f: int, in_f: int, batches, min_time: float, rounds: int, with_peers: bool) -> list[list[str]]:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    lin_bf16 = nn.Linear(in_f, out_f).to(torch.bfloat16)
    lin_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in lin.state_dict().items()})
    layers = {
        "W8": PackedLinear.from_float(lin, torch.full((out_f,), 8), CONFIG),
        "W4": PackedLinear.from_float(lin, torch.full((out_f,), 4), CONFIG),
        "W4g128": PackedLinear.from_float(lin, torch.full((out_f,), 4), CONFIG, group_size=128,
                                          grouped=torch.ones(out_f, dtype=torch.bool)),
        "mixed 4.8b": PackedLinear.from_float(lin, mixed_bits(out_f), CONFIG),
    }  # fmt: skip
    peer_mods = peers(lin) if with_peers else []
    fp32_bytes = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    rows: list[list[str]] = []
    for m in batches:
        rows += run_batch(f"{out_f}x{in_f}", m, lin, lin_bf16, layers, peer_mods, fp32_bytes, min_time, rounds)
    return rows


def run_batch(shape, m, lin, lin_bf16, layers, peer_mods, fp32_bytes, min_time, rounds) -> list[list[str]]:
    x = torch.randn(m, lin.in_features)
    xb = x.to(torch.bfloat16)
    fns: dict[str, object] = {"fp32 nn.Linear": lambda: lin(x), "bf16 nn.Linear": lambda: lin_bf16(xb)}
    info: dict[str, tuple[float | None, int, str]] = {}  # name -> (error, bytes, note)
    with torch.no_grad():
        ref_lin = lin(x)
        info["fp32 nn.Linear"] = (None, fp32_bytes, "")
        info["bf16 nn.Linear"] = (max_relative_error(lin_bf16(xb).float(), ref_lin), fp32_bytes // 2, "")
        for name, layer in layers.items():
            exact = reference_output(layer, x)
            for mode, label in (("reference", "ref"), ("cpu", "cpu")):
                twin = copy.copy(layer)  # shares the buffers; its own kernels attribute and layout slot
                twin.kernels = mode
                err = max_relative_error(twin(x), exact)
                fns[f"{name} {label}"] = lambda twin=twin: twin(x)
                extra = twin.kernel_layout_bytes() if mode == "cpu" else 0
                info[f"{name} {label}"] = (err, packed_bytes(layer) + extra, "")
        failed = []
        for name, mod, note in peer_mods:
            if mod is None:
                failed.append([shape, str(m), name, "-", "-", "-", "-", "-", "-", note])
                continue
            inp = xb if "bf16" in name else x
            try:
                info[name] = (max_relative_error(mod(inp).float(), ref_lin), 0, "bytes not measured")
                fns[name] = lambda mod=mod, inp=inp: mod(inp)
            except Exception as e:  # noqa: BLE001 - a peer that fails at run time is reported, not fatal
                failed.append([shape, str(m), name, "-", "-", "-", "-", "-", "-", f"failed: {type(e).__name__}"])
    times = timed_rounds(fns, min_time, rounds)
    t32, t16 = times["fp32 nn.Linear"][0], times["bf16 nn.Linear"][0]
    rows = []
    for name, (med, best) in times.items():
        err, nbytes, note = info[name]
        rows.append([shape, str(m), name, f"{med:,.0f}", f"{best:,.0f}", f"{t32 / med:.2f}", f"{t16 / med:.2f}",
                     "-" if err is None else f"{err:.1e}", f"{nbytes / 2**20:.1f}", note])  # fmt: skip
    return rows + failed


def print_table(rows: list[list[str]]) -> None:
    head = ["shape", "tok", "variant", "median us", "best us", "x fp32", "x bf16", "rel err", "MiB", "note"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) if i in (0, 2, 9) else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    last = None
    for r in rows:
        if last is not None and r[:2] != last:
            print()
        last = r[:2]
        print("  ".join(c.ljust(w) if i in (0, 2, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    flags = sorted({"avx512_bf16", "amx_bf16", "avx512_vnni"} & cpu_kernels.cpu_flags())
    return (f"{platform.machine()} {model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}; {', '.join(flags) or 'no bf16 flags'}), "
            f"{torch.get_num_threads()} threads, cpu kernels available: {cpu_kernels.available()}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1024x1024 and 2048x8192 at batch 1 only")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per row (default 0.3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per row (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-peers", action="store_true", help="skip torchao / optimum-quanto")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ((1024, 1024), (2048, 8192)) if args.quick else SHAPES
    batches = (1,) if args.quick else args.batches
    print(machine())
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for out_f, in_f in shapes:
        rows += run_shape(out_f, in_f, batches, args.min_time, args.rounds, not args.no_peers)
    print_table(rows)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
