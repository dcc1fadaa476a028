"""Fast forward kernels for `qvla_quant.packed.PackedLinear`, and the rule that picks one per call.

The packed format (layout 3, `qvla_quant.packed`) is a storage format: row groups of 8/6/4/3/2-bit codes in bit
planes, fp32 per-row (or per-group) scales, uint8 zero points, 16-bit kept rows, an int32 `row_index`. Its own
forward (the "reference" path, in packed.py) dequantizes ~2 MiB blocks per call and multiplies in fp32: exact, but
on a CPU 3.5-7x slower than nn.Linear at one token. The kernels here read the same buffers and never change them:

    cpu     (`qvla_quant.kernels.cpu`)            torch's own CPU low-bit matmuls (`torch._weight_int8pack_mm`,
                                                  `aten._weight_int4pack_mm_for_cpu`) on a resident layout repacked
                                                  once from the stored codes; bf16 activations, fp32 epilogue
    triton  (`qvla_quant.kernels.triton_kernels`) one Triton kernel family for GPUs: codes unpacked in registers,
                                                  outputs stored straight to their original rows, bias fused

Both hold their repacked layout in a plain attribute of the layer, derived from the stored buffers and keyed on
them (see `LayoutKey`): never a buffer, so never saved, never cast by `.half()`, and rebuilt when the buffers are
loaded, moved or replaced. The artifact format and `state_dict` keys do not change.

Dispatch (`select`, called by `PackedLinear.forward` for linear layers and A8 inputs alike):

    mode = layer.kernels (per-layer attribute; `transforms.set_kernels(model, mode)` sets every layer)
           or the environment variable QVLA_KERNELS, else "auto"

    "reference"  always the packed.py path
    "cpu"        the CPU kernels for CPU inputs (RuntimeError if this torch lacks the ops); reference otherwise
    "triton"     the Triton kernels for any input they can run on: CUDA tensors, or CPU tensors under the Triton
                 interpreter (TRITON_INTERPRET=1 set before triton was imported); RuntimeError if triton is missing
    "auto"       CPU input and `cpu.available()` (the ops exist, pass a one-time self-check, and the CPU has native
                 bf16: avx512_bf16 or amx_bf16): cpu; CUDA input and `triton_kernels.available()`: triton (fp32
                 inputs only up to `AUTO_TRITON_FP32_MAX_TOKENS` = 16 tokens: the kernels keep fp32 exact with
                 FMAs, where the reference's cuBLAS on dequantized rows is faster for many tokens); otherwise
                 reference

    A layer always takes the reference path when it has `cache_dequantized` on (the user asked for nn.Linear on a
    cached weight), when autograd must see the input (grad enabled and x.requires_grad: the kernels have no
    backward), or when x is not fp32/bf16/fp16. Convs keep F.conv2d on the dequantized weight, except A8 convs,
    whose patches go through `_linear_stored` and so through the kernels.

Numerics (tests: tests/qvla_quant/test_kernels_cpu.py, test_kernels_triton.py). The reference accumulates in fp32.
The CPU kernels take bf16 activations and write bf16 partial outputs, so with u = 2^-8 (bf16 unit roundoff) every
output o obeys, for the dequantized weight W and stored-row output y_o = x . W_o:

    |y_o - ref_o| <= u |y_o| + 2 u sum_k |x_k| |W_ok|
                     (+ u sum_k |x_k| (|W_ok| + |8 - z_j| s_j) for grouped rows, whose scales the int4 kernel reads
                     in bf16; + K 2^-24 sum_k |x_k| |W_ok| for the fp32 sums)

`reference.error_bound` computes it; the tests check it elementwise (measured: at most 0.55 of it) and the relative
error max |y - ref| / max |ref| against 1e-2 (measured 2e-3 .. 5.1e-3 at K = 5..512, fp32 and 16-bit inputs).
The Triton kernels accumulate in fp32 from the input dtype: in fp32 they match the reference to ~2e-7 of max
|output|, in fp16 / bf16 within the input dtype's own rounding (measured ~3e-4 in fp16).
"""

from __future__ import annotations

import os
import weakref

import torch

from qvla_quant.kernels import cpu, triton_kernels

MODES: tuple[str, ...] = ("auto", "reference", "cpu", "triton")
ENV_VAR = "QVLA_KERNELS"
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" sends fp32 CUDA inputs to Triton only up to this many tokens (GEMV-like, memory-bound shapes)
AUTO_TRITON_FP32_MAX_TOKENS = 16


def kernel_mode(layer_mode: str | None = None) -> str:
    """The mode in force: `layer_mode` (a layer's `kernels` attribute) if set, else $QVLA_KERNELS, else "auto"."""
    mode = layer_mode if layer_mode is not None else os.environ.get(ENV_VAR, "auto")
    mode = str(mode).strip().lower() or "auto"
    if mode not in MODES:
        source = "layer.kernels" if layer_mode is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} = {mode!r}: expected one of {MODES}")
    return mode


def select(layer, x: torch.Tensor) -> str | None:
    """Which kernel family runs `layer` (a PackedLinear) on input `x`: "cpu", "triton" or None (reference)."""
    mode = kernel_mode(getattr(layer, "kernels", None))
    if mode == "reference" or layer.cache_dequantized or x.dtype not in _FAST_DTYPES:
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None
    if mode == "cpu":
        if x.device.type != "cpu":
            return None
        if not cpu.has_ops():
            raise RuntimeError(f"{ENV_VAR}=cpu: this torch ({torch.__version__}) lacks the CPU low-bit matmul ops")
        return "cpu"
    if mode == "triton":
        if not triton_kernels.available(check_device=False):
            raise RuntimeError(f"{ENV_VAR}=triton: triton is not importable ({triton_kernels.unavailable_reason()})")
        if x.device.type == "cuda" or (x.device.type == "cpu" and triton_kernels.interpreter_active()):
            return "triton"
        return None
    # auto
    if x.device.type == "cpu":
        return "cpu" if cpu.available() else None
    if x.device.type == "cuda":
        if x.dtype == torch.float32 and x.reshape(-1, x.shape[-1]).shape[0] > AUTO_TRITON_FP32_MAX_TOKENS:
            return None  # fp32 tiles use exact fp32 FMAs (no tensor cores): cuBLAS on the dequantized rows wins
        return "triton" if triton_kernels.available() else None
    return None


class LayoutKey:
    """Identity of the stored buffers a repacked layout was built from, checked at every fast call.

    Weak references (a layout never keeps replaced buffers alive) plus each buffer's in-place version counter: a
    `load_state_dict` copies into the same tensors and bumps their versions, `.to()` / `load_state_dict(assign=True)`
    replace them. About 6 us for the 27 buffers of a PackedLinear (a tuple of ids, shapes and data pointers: 35 us).
    """

    __slots__ = ("kind", "device", "refs")

    def __init__(self, layer, kind: str, device: torch.device):
        self.kind, self.device = kind, device
        self.refs = tuple(None if t is None else (weakref.ref(t), _version(t)) for t in layer._buffers.values())

    def matches(self, layer, kind: str, device: torch.device) -> bool:
        if kind != self.kind or device != self.device or len(layer._buffers) != len(self.refs):
            return False
        for t, ref in zip(layer._buffers.values(), self.refs):
            if t is None or ref is None:
                if t is not ref:
                    return False
            elif ref[0]() is not t or _version(t) != ref[1]:
                return False
        return True


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter (and cannot be changed in place)
        return -1


__all__ = [
    "AUTO_TRITON_FP32_MAX_TOKENS",
    "ENV_VAR",
    "MODES",
    "LayoutKey",
    "cpu",
    "kernel_mode",
    "select",
    "triton_kernels",
]
