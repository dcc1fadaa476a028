"""What the kernels are checked against: the exact output of a packed layer, and the error bound of a bf16 path.

`reference_output(layer, x)` is the layer's math of `qvla_quant.packed` (w = (q - z) s per row or group, kept rows
as stored, pruned rows output their bias) evaluated in float64 from the dequantized fp32 weight: the "truth" that
the reference path (fp32 accumulation, ~1e-6 relative) and every kernel approximate.

`error_bound(layer, x, u)` bounds, output by output, what a path loses when it rounds the activations once to a
format of unit roundoff u, rounds each stored-row output once (before the fp32 scale and bias), and, for grouped
rows, reads the group scale a and offset b = e a (|e| <= |8 - z|) of the int4 kernel in that format:

    |y_o - ref_o| <= u |y_o| + 2 u sum_k |x_k| |W_ok| + sum_k |x_k| E_ok + K 2^-24 sum_k |x_k| |W_ok| + tiny
    E_ok = u (|W_ok| + |8 - z_j| s_j) for a grouped row (j = k's group), 0 otherwise

(y_o without bias; the second term covers the rounded activations and, in the many-token path, the weights rounded
to bf16; the fourth the fp32 sums). An output stored in a 16-bit dtype adds that dtype's rounding of |ref_o|.
"""

from __future__ import annotations

import torch

from qvla_quant.codes import group_suffix, unpack_codes
from qvla_quant.quantizer import expand_groups

BF16_U = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
FP16_U = 2.0**-11
FP32_U = 2.0**-24
UNIT_ROUNDOFF = {torch.bfloat16: BF16_U, torch.float16: FP16_U, torch.float32: FP32_U}


def reference_weight(layer) -> torch.Tensor:
    """The dequantized weight [out, K] in fp32 (pruned rows zero): `PackedLinear.dequantized_weight`."""
    return layer.dequantized_weight(torch.float32).reshape(layer.out_features, layer.in_features)


def reference_output(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's exact output for x [..., K], in float64 (bias included, pruned rows = bias)."""
    w = reference_weight(layer).double().to(x.device)
    y = x.double() @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.double().to(x.device)
    return y


def grouped_weight_error(layer, u: float = BF16_U) -> torch.Tensor:
    """E [out, K]: per-weight error bound of grouped rows read by the int4 kernel with bf16 scale and zero."""

    k = layer.in_features
    err = torch.zeros(layer.out_features, k, dtype=torch.float64)
    index = layer.row_index.long().cpu()
    start = 0
    for c, n in layer.storage_groups():
        if c.grouped and n:
            sfx = group_suffix(c)
            v = unpack_codes(getattr(layer, f"qweight_{sfx}").cpu(), c.bits, k).double()
            s = expand_groups(getattr(layer, f"scale_{sfx}").cpu().double(), k, layer.group_size)
            z = expand_groups(getattr(layer, f"zero_{sfx}").cpu().double(), k, layer.group_size)
            err[index[start : start + n]] = u * s * ((v - z).abs() + (8 - z).abs())
        start += n
    return err


def error_bound(layer, x: torch.Tensor, u: float = BF16_U, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise bound [..., out] (float64) on |path - reference_output| for a path that works at unit roundoff u
    (see the module docstring); `out_dtype`: the dtype the path returns (its final rounding is added)."""
    w = reference_weight(layer).double().to(x.device)
    xd = x.double()
    y = xd @ w.t()
    mag = xd.abs() @ w.abs().t()
    bound = u * y.abs() + (2 * u + layer.in_features * FP32_U) * mag
    bound = bound + xd.abs() @ grouped_weight_error(layer, u).to(x.device).t()
    if out_dtype is not None and out_dtype != torch.float32:
        ref = reference_output(layer, x)
        bound = bound + UNIT_ROUNDOFF[out_dtype] * (ref.abs() + bound)
    return bound + 1e-30


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the figure the tests and benchmarks report)."""
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    return err / max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)


__all__ = [
    "BF16_U",
    "error_bound",
    "grouped_weight_error",
    "max_relative_error",
    "reference_output",
    "reference_weight",
]
