"""GPU speed of the Triton kernels of PackedLinear against bf16 cuBLAS, per layer shape and batch; prints every timing.

    PYTHONPATH=src python bench/gpu_check.py            # the full table (~2-4 min on one H100/H200, most of it
                                                        # Triton compiling each specialisation once)
    PYTHONPATH=src python bench/gpu_check.py --quick    # 2 shapes x batch 1 and 16
(`bench/gpu_check.sh` runs the CUDA kernel tests first, then this.) Without CUDA it says so and exits 0.

Shapes are out x in (nn.Linear(in, out)): 2048x2048, 2048x16384, 16384x2048, 1024x4096, 4096x4096, 4096x11008,
11008x4096; batches (tokens) 1, 4, 16, 512; bf16 activations. Per shape and batch:
    bf16       F.linear on the bf16 weight (cuBLAS)
    W8 W4 W2   every row at that width (per-row scale and zero)
    mixed      rows at 16/8/6/4/3/2/0 bits in 2/8/5/50/10/20/5 % (3.96 bits on average)
Each Triton row is timed twice: "graph" (the layer's forward captured in a CUDA graph and replayed, i.e. the
kernels' GPU time without Python launch overhead, which a deployed policy also avoids with graphs) and "eager"
(plain calls). Columns: microseconds (median of CUDA-event timings over repeated runs), speed-up over bf16
(graph), the memory-bound ideal 16 / average bits, the share of that ideal reached, and the max relative error
against the layer's exact output (float64).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = ((2048, 2048), (2048, 16384), (16384, 2048), (1024, 4096), (4096, 4096), (4096, 11008), (11008, 4096))
BATCHES = (1, 4, 16, 512)
MIXED = {16: 0.02, 8: 0.08, 6: 0.05, 4: 0.50, 3: 0.10, 2: 0.20, 0: 0.05}


def mixed_bits(out: int, seed: int = 0) -> torch.Tensor:
    counts = {b: round(f * out) for b, f in MIXED.items()}
    counts[4] += out - sum(counts.values())
    bits = torch.cat([torch.full((n,), b) for b, n in counts.items()])
    return bits[torch.randperm(out, generator=torch.Generator().manual_seed(seed))]


def cuda_time_us(fn, reps: int = 50, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time of `reps` back-to-back calls, by CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        means.append(start.elapsed_time(stop) * 1e3 / reps)
    return statistics.median(means)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream, as torch.cuda.graphs asks); None on failure."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def run(shapes, batches, reps: int) -> int:
    from qvla_quant.config import QuantConfig, WeightQuantConfig
    from qvla_quant.kernels import triton_kernels

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
          f"torch {torch.__version__}, triton {_triton_version()}")  # fmt: skip
    reason = triton_kernels.unavailable_reason()
    if reason:
        print(f"gpu_check: Triton kernels unavailable: {reason}")
        return 1
    config = QuantConfig(weight=WeightQuantConfig(clip_search=False))
    head = f"{'shape':>11} {'tok':>4} {'variant':<8} {'bits':>5} {'graph us':>9} {'eager us':>9} {'x bf16':>7} " \
           f"{'ideal x':>7} {'% ideal':>7} {'rel err':>8}"  # fmt: skip
    print(head)
    print("-" * len(head))
    failures = 0
    for out_f, in_f in shapes:
        failures += run_shape(out_f, in_f, batches, reps, config, dev)
        torch.cuda.empty_cache()
    return 1 if failures else 0


def run_shape(out_f: int, in_f: int, batches, reps: int, config, dev) -> int:
    from qvla_quant.packed import PackedLinear

    torch.manual_seed(0)
    t0 = time.perf_counter()
    lin = nn.Linear(in_f, out_f, device=dev)
    w16, b16 = lin.weight.detach().to(torch.bfloat16), lin.bias.detach().to(torch.bfloat16)
    layers = {}
    for name, bits in (("W8", torch.full((out_f,), 8)), ("W4", torch.full((out_f,), 4)),
                       ("W2", torch.full((out_f,), 2)), ("mixed", mixed_bits(out_f))):  # fmt: skip
        layer = PackedLinear.from_float(lin, bits, config)
        layer.kernels = "triton"
        layers[name] = layer
    print(f"# {out_f}x{in_f}: quantized in {time.perf_counter() - t0:.1f} s", flush=True)
    return sum(run_batch(out_f, in_f, m, w16, b16, layers, reps, dev) for m in batches)


def run_batch(out_f, in_f, m, w16, b16, layers, reps, dev) -> int:
    from qvla_quant.kernels.reference import max_relative_error, reference_output

    failures = 0
    x = torch.randn(m, in_f, device=dev, dtype=torch.bfloat16)
    t_bf16 = cuda_time_us(lambda: F.linear(x, w16, b16), reps)
    try:
        t_bf16_g = cuda_time_us(graphed(lambda: F.linear(x, w16, b16)), reps)
    except RuntimeError:
        t_bf16_g = float("nan")
    print(f"{out_f:>5}x{in_f:<5} {m:>4} {'bf16':<8} {16:>5.2f} {t_bf16_g:>9.1f} {t_bf16:>9.1f} {1.0:>7.2f} "
          f"{1.0:>7.2f} {100.0:>6.0f}% {'-':>8}", flush=True)  # fmt: skip
    base = t_bf16_g if t_bf16_g == t_bf16_g else t_bf16
    for name, layer in layers.items():
        avg = layer.average_bits()
        try:
            with torch.no_grad():
                err = max_relative_error(layer(x), reference_output(layer, x.float()))
                t_eager = cuda_time_us(lambda layer=layer: layer(x), reps)
                try:
                    t_graph = cuda_time_us(graphed(lambda layer=layer: layer(x)), reps)
                except RuntimeError as e:
                    print(f"  (graph capture failed for {name}: {str(e)[:80]})")
                    t_graph = float("nan")
        except Exception as e:  # noqa: BLE001 - report every failure and go on with the table
            failures += 1
            print(f"{out_f:>5}x{in_f:<5} {m:>4} {name:<8} FAILED: {type(e).__name__}: {str(e)[:200]}")
            continue
        t = t_graph if t_graph == t_graph else t_eager
        ideal = 16.0 / avg if avg else float("inf")
        speed = base / t
        print(f"{out_f:>5}x{in_f:<5} {m:>4} {name:<8} {avg:>5.2f} {t_graph:>9.1f} {t_eager:>9.1f} "
              f"{speed:>7.2f} {ideal:>7.2f} {100 * speed / ideal:>6.0f}% {err:>8.1e}", flush=True)  # fmt: skip
    return failures


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "not importable"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 and 11008x4096 at batch 1 and 16")
    p.add_argument("--reps", type=int, default=50, help="calls per timing round (default 50)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__}: nothing to measure (this script is "
              "for a machine with an NVIDIA GPU)")  # fmt: skip
        return 0
    shapes = ((4096, 4096), (11008, 4096)) if args.quick else SHAPES
    batches = (1, 16) if args.quick else BATCHES
    t0 = time.perf_counter()
    rc = run(shapes, batches, args.reps)
    print(f"gpu_check: done in {time.perf_counter() - t0:.0f} s, exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
