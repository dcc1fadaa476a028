"""Packed mixed-precision layer on CPU: weight bytes and forward time against fp32 nn.Linear / nn.Conv2d.

Reproduce (from the repository root; takes about three minutes on 2 cores):

    PYTHONPATH=src .venv/bin/python bench/bench_packed.py            # all shapes and mixes
    PYTHONPATH=src .venv/bin/python bench/bench_packed.py --quick    # the 1024x1024 layer only

Columns: bits per weight as planned (b x K per row), the per-row overhead in bits per weight (fp32 scale + uint8
zero + int32 row index per quantized row, int32 row index per 16-bit kept row, byte padding) and the stored bits
per weight (the two added); the stored weight bytes (bias excluded; equal to what the plan implies,
`predicted_weight_bytes`) and their ratio to fp32 / bf16 weights; forward time in ms at 1 token and at 256 tokens
(a conv: one 224x224 image, 256 patches), the best of --rounds x --repeat calls (rounds spread over the run: on a
shared 2-core machine the minimum is the stable statistic), for
    packed   PackedLinear, dequantizing blocks of rows on every call (the default)
    naive    dequantizing the whole layer at once, then one matmul (the obvious implementation, for comparison)
    cached   PackedLinear(cache_dequantized=True): dequantized once, kept in fp32 (memory of an fp32 layer)
    fp32     the source nn.Linear / nn.Conv2d
x fp32 = packed / fp32 time. Note: on machines with a large L3 cache the fp32 weight of these layers stays in
cache between calls, which flatters fp32 at batch 1; a multi-GB model does not fit and reads from DRAM.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from qvla_quant.config import QuantConfig, WeightQuantConfig
from qvla_quant.packed import PackedLinear, predicted_weight_bytes
from qvla_quant.plan import LayerPlan

# 4.0 bits on average with 10% of the rows pruned: 5% kept, 5% int8, 60% int4, 20% int2
MIXES = {
    "W8": {8: 1.0},
    "W4": {4: 1.0},
    "W2": {2: 1.0},
    "mix4 (10% pruned)": {0: 0.10, 16: 0.05, 8: 0.05, 4: 0.60, 2: 0.20},
}
CONFIG = QuantConfig(weight=WeightQuantConfig(clip_search=False))  # clipping changes values, not the runtime


def mix_bits(out: int, fractions: dict[int, float], seed: int = 0) -> torch.Tensor:
    counts = {b: round(f * out) for b, f in fractions.items()}
    counts[max(counts, key=counts.get)] += out - sum(counts.values())
    bits = torch.cat([torch.full((n,), b) for b, n in counts.items()])
    return bits[torch.randperm(out, generator=torch.Generator().manual_seed(seed))]


def best_ms(fn, repeat: int) -> float:
    with torch.inference_mode():
        fn()
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def naive_forward(layer: PackedLinear, x2: torch.Tensor) -> torch.Tensor:
    y = torch.nn.functional.linear(x2, layer.stored_weight(torch.float32))
    return layer._scatter(y)


class Case:
    """One layer and mix: the packed layer, its cached twin, the fp32 source and the inputs."""

    def __init__(self, name: str, module: nn.Module, bits: torch.Tensor):
        self.module = module
        self.layer = PackedLinear.from_float(module, bits, CONFIG)
        self.cached = PackedLinear.from_float(module, bits, CONFIG, cache_dequantized=True)
        out, k = self.layer.out_features, self.layer.in_features
        self.kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        lp = LayerPlan(name, "bench", self.kind, out, k, bits.tolist())
        assert self.layer.weight_bytes() == predicted_weight_bytes(lp, torch.float32)
        self.row = {
            "bytes": self.layer.weight_bytes(),
            "fp32": out * k * 4,
            "bf16": out * k * 2,
            "avg": lp.total_bits / lp.n_weights,
            "overhead": self.layer.overhead_bits_per_weight(),
            "stored": self.layer.stored_bits_per_weight(),
        }
        if self.kind == "linear":
            self.inputs = {"1": torch.randn(1, k), "256": torch.randn(256, k)}
        else:
            self.inputs = {"256": torch.randn(1, 3, 224, 224)}

    def measure(self, repeat: int) -> None:
        """Time every variant; keep the best time seen over all rounds."""
        for tokens, x in self.inputs.items():
            fns = {"packed": lambda x=x: self.layer(x), "cached": lambda x=x: self.cached(x)}
            fns["fp32"] = lambda x=x: self.module(x)
            if self.kind == "linear":
                fns["naive"] = lambda x=x: naive_forward(self.layer, x)
            for variant, fn in fns.items():
                key = f"{variant}{tokens}"
                self.row[key] = min(self.row.get(key, float("inf")), best_ms(fn, repeat))


def fmt(row: dict, key: str) -> str:
    return f"{row[key]:8.2f}" if key in row else f"{'-':>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 1024x1024 layer")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all cases; the best time is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shapes = {"linear 1024x1024": nn.Linear(1024, 1024)}
    if not args.quick:
        shapes["linear 2048x8192 (in x out)"] = nn.Linear(2048, 8192)
        shapes["conv 3->1152 k14 s14 (224px)"] = nn.Conv2d(3, 1152, kernel_size=14, stride=14)
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"
    )
    header = (
        f"{'layer':30} {'mix':18} {'bits':>5} {'+ovh':>6} {'stored':>6} {'MiB':>7} {'/fp32':>6} {'/bf16':>6} |"
        f" {'1 tok: packed':>13} {'naive':>8} {'cached':>8} {'fp32':>8} {'x fp32':>6} |"
        f" {'256 tok: packed':>15} {'naive':>8} {'cached':>8} {'fp32':>8} {'x fp32':>6}"
    )
    print(header)
    print("-" * len(header))
    cases = {
        (shape, mix): Case(shape, module, mix_bits(module.weight.shape[0], fractions))
        for shape, module in shapes.items()
        for mix, fractions in MIXES.items()
    }
    for _ in range(args.rounds):  # rounds spread the timings over time: bursts of load on a shared machine pass
        for case in cases.values():
            case.measure(args.repeat)
    for (shape, mix), case in cases.items():
        r = case.row
        x1 = f"{r['packed1'] / r['fp321']:6.1f}" if "packed1" in r else f"{'-':>6}"
        x256 = f"{r['packed256'] / r['fp32256']:6.1f}"
        print(
            f"{shape:30} {mix:18} {r['avg']:5.2f} {r['overhead']:+6.3f} {r['stored']:6.3f} {r['bytes'] / 2**20:7.3f}"
            f" {r['bytes'] / r['fp32']:6.3f}"
            f" {r['bytes'] / r['bf16']:6.3f} | {fmt(r, 'packed1'):>13} {fmt(r, 'naive1')} {fmt(r, 'cached1')}"
            f" {fmt(r, 'fp321')} {x1} | {fmt(r, 'packed256'):>15} {fmt(r, 'naive256')} {fmt(r, 'cached256')}"
            f" {fmt(r, 'fp32256')} {x256}"
        )


if __name__ == "__main__":
    main()
