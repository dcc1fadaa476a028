"""One layer, called many times in one process: the unit a whole-process timer can compare (e.g. /usr/bin/time).

    PYTHONPATH=src .venv/bin/python bench/layer_loop.py --kind w4 --shape 2048x8192 --calls 3000
    PYTHONPATH=src .venv/bin/python bench/layer_loop.py --kind fp32 --shape 2048x8192 --calls 3000

kinds: fp32 / bf16 (nn.Linear in that dtype), w8 / w4 / mixed (a PackedLinear, uniform or a mixed plan of average
~4.8 bits, on the default kernel path; add --kernels reference for the exact fp32 path). Batch 1 by default, one
token per call, like the action expert's denoising steps. Start-up (imports, building the layer, the first call)
is the same for every kind, so the difference between two runs is the calls; --calls 0 measures start-up alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qvla_quant.config import QuantConfig, WeightQuantConfig  # noqa: E402
from qvla_quant.packed import PackedLinear  # noqa: E402


def build(kind: str, out_f: int, in_f: int, kernels: str | None):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    if kind in ("fp32", "bf16"):
        return lin.to(torch.bfloat16 if kind == "bf16" else torch.float32), torch.bfloat16 if kind == "bf16" else None
    if kind == "mixed":
        counts = {8: out_f // 8, 4: out_f // 2, 2: out_f // 4}
        counts[16] = out_f - sum(counts.values()) - out_f // 32
        counts[0] = out_f // 32
        bits = torch.cat([torch.full((n,), b) for b, n in counts.items()])[torch.randperm(out_f)]
    else:
        bits = torch.full((out_f,), {"w8": 8, "w4": 4}[kind])
    # plain min-max ranges: the clip search would make start-up slow, and the codes do not change the speed
    layer = PackedLinear.from_float(lin, bits.tolist(), QuantConfig(weight=WeightQuantConfig(clip_search=False)))
    layer.kernels = kernels
    return layer, None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=("fp32", "bf16", "w8", "w4", "mixed"))
    p.add_argument("--shape", default="2048x8192", help="OUTxIN")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernels", default=None, help="reference / cpu / auto (packed kinds; default: auto)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    layer, dtype = build(args.kind, out_f, in_f, args.kernels)
    x = torch.randn(args.batch, in_f, dtype=dtype or torch.float32)
    with torch.inference_mode():
        y = layer(x)  # builds any resident layout before the timed calls
        for _ in range(args.calls):
            y = layer(x)
    print(f"{args.kind} {args.shape} batch {args.batch}: {args.calls} calls, output {tuple(y.shape)} {y.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
