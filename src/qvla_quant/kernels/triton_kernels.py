"""Triton kernels for `PackedLinear` on GPUs: one kernel family over a layer's row groups, reading layout 3 as stored.

Importing this module never imports triton; `available()` says whether the kernels can run here and
`unavailable_reason()` why not. The kernels are defined at their first use, so TRITON_INTERPRET=1 (Triton's CPU
interpreter, used by the tests) only has to be set before that first call.

No repacking: the kernels read the stored buffers of the packed format in place (`qvla_quant.packed`: qweight_b
[rows, code_bytes(K, b)] uint8 in bit planes, scale_b fp32, zero_b uint8 per row or [rows, G] per group, kept
[rows, K] 16-bit, row_index int32). The resident "layout" (`TritonLayout`) is only a list of views of those
buffers plus the int32 indices of the pruned rows: no memory beyond the stored format.

One launch per non-empty storage group (MixLLM-style; up to 9 per layer), all of the one kernel
`_rowgroup_matmul`, specialised by constexprs:

    P0, P1      bit-plane widths of the group's code (8 | 6 = 4 + 2 | 4 | 3 = 2 + 1 | 2; P1 = 0: one plane); P0 = 16:
                the kept rows, read as 16-bit values
    GROUPED     group-wise scale and zero (g = GS columns each); per-row otherwise
    USE_DOT     tl.dot tiles (tensor cores) for more than `GEMV_MAX_TOKENS` tokens; a broadcast multiply and
                tl.sum (CUDA cores) for 1-4 tokens, where a 16-row dot tile would be 75-94 % padding
    ATOMIC      K split over `split_k` programs (a run-time argument, so new split counts compile nothing) whose
                fp32 partial sums are added atomically into a zeroed fp32 workspace (GEMV / skinny shapes with too
                few row tiles to fill the GPU), then cast

Program (pid_n, pid_m, pid_k) computes rows [pid_n BN, +BN) of the group for tokens [pid_m BM, +BM) over its K
split. Per K-chunk of BK columns, in registers:

    plane field  f_p(k) = (byte[off_p + k // (8 / p)] >> (p (k % (8 / p)))) & (2^p - 1)       (column 0 in low bits)
    code         q(k)   = f_P0(k) | (f_P1(k) << P0)
    weight       per-row:  w = q - z            (an exact small integer; s is applied to the fp32 sum)
                 grouped:  w = (q - z_j) s_j    (j = k // GS, one group per chunk: BK divides GS)
                 kept:     w = the stored 16-bit value
    acc[m, n]   += sum_k x[m, k] w[n, k]        in fp32 (tl.dot: operands in the input dtype, fp32 accumulation;
                                                 fp32 inputs use input_precision "ieee", not tf32)

Columns k >= K are masked (a plane's last byte is padded with code 0 and must not count). Epilogue: acc * s_n
(per-row groups) + bias[row_index[n]] (split 0 only, when split), stored (or atomically added) straight to
y[m, row_index[n]]: the output's original row, no scatter pass. Pruned rows get their bias (or 0) from one indexed
copy before the launches. `stored_only` (the `_linear_stored` contract: stored rows in storage order) writes
column = position in storage order instead of row_index, with the bias gathered into that order.

Numerics: fp32 inputs accumulate in fp32 from exact (q - z) (per-row) or fp32 (q - z) s (grouped): the reference
up to summation order (~1e-6 relative). fp16 / bf16 inputs: per-row weights (q - z) are exact in either dtype
(|q - z| <= 255), grouped ones are rounded once to it, products accumulate in fp32 and the output is rounded once.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from qvla_quant.codes import group_suffix

GEMV_MAX_TOKENS = 4  # up to this many tokens: the CUDA-core broadcast-sum variant
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# availability


def interpreter_active() -> bool:
    """Whether Triton's interpreter is requested (kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure makes the kernels unavailable, with its reason
        return f"import triton failed: {type(e).__name__}: {e}"
    return None


def unavailable_reason(check_device: bool = True) -> str | None:
    """None if the kernels can run here, else why not."""
    err = _import_error()
    if err is not None:
        return err
    if check_device and not interpreter_active() and not torch.cuda.is_available():
        return "no CUDA device (and TRITON_INTERPRET is not set)"
    return None


def available(check_device: bool = True) -> bool:
    """Whether triton imports and (with `check_device`) a CUDA device or the interpreter is there to run on."""
    return unavailable_reason(check_device) is None


# ---------------------------------------------------------------------------------------------------------------
# the kernel (defined at first use)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel; `interpret` is part of the cache key because triton.jit reads TRITON_INTERPRET when it
    wraps the function."""
    del interpret
    import triton
    import triton.language as tl

    @triton.jit
    def _rowgroup_matmul(
        x_ptr, w_ptr, s_ptr, z_ptr, col_ptr, bias_ptr, y_ptr,
        M, N, K, plane1_off, stride_xm, stride_wn, stride_sn, stride_ym, split_k,
        GS: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
        USE_DOT: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_mask = rn < N
        m_mask = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if P0 != 16:
            if not GROUPED:
                z_row = tl.load(z_ptr + rn, mask=n_mask, other=0).to(tl.float32)
        # this program's share of K, a whole number of BLOCK_K chunks
        k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
        k_lo = pid_k * k_chunk
        w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
        for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # fmt: skip
            w_mask = n_mask[:, None] & k_mask[None, :]
            if P0 == 16:
                w = tl.load(w_rows + rk[None, :], mask=w_mask, other=0.0).to(tl.float32)
            else:
                # fields per byte: 8 // P0 (constexpr arithmetic, folded at compile time)
                b0 = tl.load(w_rows + (rk // (8 // P0))[None, :], mask=w_mask, other=0).to(tl.int32)
                q = (b0 >> ((rk % (8 // P0)) * P0)[None, :]) & ((1 << P0) - 1)
                if P1 > 0:
                    b1 = tl.load(w_rows + plane1_off + (rk // (8 // P1))[None, :], mask=w_mask, other=0).to(tl.int32)
                    q = q | (((b1 >> ((rk % (8 // P1)) * P1)[None, :]) & ((1 << P1) - 1)) << P0)
                if GROUPED:
                    j = k0 // GS  # BLOCK_K divides GS: one group per chunk
                    s_g = tl.load(s_ptr + rn * stride_sn + j, mask=n_mask, other=0.0)
                    z_g = tl.load(z_ptr + rn * stride_sn + j, mask=n_mask, other=0).to(tl.float32)
                    w = (q.to(tl.float32) - z_g[:, None]) * s_g[:, None]
                else:
                    w = q.to(tl.float32) - z_row[:, None]
            w = tl.where(w_mask, w, 0.0)
            if USE_DOT:
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        if P0 != 16:
            if not GROUPED:
                acc = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0)[None, :]
        col = tl.load(col_ptr + rn, mask=n_mask, other=0)
        if HAS_BIAS:
            b = tl.load(bias_ptr + col, mask=n_mask, other=0.0).to(tl.float32)
            if ATOMIC:  # split K: only the first split adds the bias
                b = b * (pid_k == 0).to(tl.float32)
            acc += b[None, :]
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + col[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=out_mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    return _rowgroup_matmul


# ---------------------------------------------------------------------------------------------------------------
# layout and launch


@dataclass
class _Group:
    bits: int  # 8, 6, 4, 3, 2 or 16 (kept)
    grouped: bool
    rows: int
    w: torch.Tensor  # qweight_b (uint8) or kept (16-bit)
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    cols: torch.Tensor  # int32 [rows]: output column of each row (row_index slice)
    start: int  # offset of the group in storage order


@dataclass
class TritonLayout:
    """Views of a PackedLinear's stored buffers for the kernels (nothing repacked)."""

    key: object
    k: int
    out_features: int
    n_stored: int
    group_size: int | None
    groups: list[_Group] = field(default_factory=list)
    bias: torch.Tensor | None = None  # the layer's full bias (indexed by output row)
    bias_stored: torch.Tensor | None = None  # bias[row_index] (indexed by storage position, for stored_only)
    pruned: torch.Tensor | None = None  # long [n_pruned]
    storage_cols: torch.Tensor | None = None  # int32 arange(n_stored), for stored_only
    split_k: int | None = None  # forced split (tests); None: heuristic

    def nbytes(self) -> int:
        """Bytes beyond the stored buffers: the index vectors."""
        ts = [self.pruned, self.storage_cols, self.bias_stored]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def build_layout(layer, key: object = None, device: torch.device | None = None) -> TritonLayout:
    """Collect the views of `layer`'s buffers (which must be on `device`) the kernels read."""

    device = torch.device(device) if device is not None else layer.row_index.device
    if layer.row_index.device != device:
        raise RuntimeError(f"PackedLinear buffers are on {layer.row_index.device}, the input on {device}: move the "
                           "layer (layer.to(device)) first")  # fmt: skip
    index = layer.row_index.to(torch.int32)
    lay = TritonLayout(key=key, k=layer.in_features, out_features=layer.out_features, n_stored=index.numel(),
                       group_size=layer.group_size)  # fmt: skip
    start = 0
    for c, n in layer.storage_groups():
        if n:
            if c.bits == 16:
                g = _Group(16, False, n, layer.kept, None, None, index[start : start + n], start)
            else:
                sfx = group_suffix(c)
                g = _Group(c.bits, c.grouped, n, getattr(layer, f"qweight_{sfx}"), getattr(layer, f"scale_{sfx}"),
                           getattr(layer, f"zero_{sfx}"), index[start : start + n], start)  # fmt: skip
            lay.groups.append(g)
        start += n
    lay.bias = layer.bias
    lay.bias_stored = None if layer.bias is None else layer.bias[index.long()].contiguous()
    stored = torch.zeros(layer.out_features, dtype=torch.bool, device=index.device)
    stored[index.long()] = True
    pruned = (~stored).nonzero().squeeze(1)
    lay.pruned = pruned if pruned.numel() else None
    lay.storage_cols = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return lay


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def launch_config(m: int, n: int, k: int, group_size: int | None, device: torch.device, split_k: int | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, USE_DOT, num_warps) for one group launch (heuristics, no autotuning:
    the interpreter only takes one config, and a GPU run should not pay a tuning pass per shape)."""
    use_dot = m > GEMV_MAX_TOKENS
    if use_dot:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        bn = 64 if m <= 64 else 128
        bk = 64 if group_size is None or group_size % 64 == 0 else 32
        warps = 4 if bm * bn <= 64 * 64 else 8
    else:
        # one token: 128 columns per chunk (64 bytes of a 4-bit row: whole 32-byte sectors); 2-4 tokens: 64, so
        # the [BM, BN, BK] product stays at <= 64 fp32 registers per thread
        bm, bn, bk, warps = _pow2(m), 32, 128 if m == 1 else 64, 4
    if group_size is not None:
        bk = min(bk, group_size)  # one scale group per chunk
    n_tiles = -(-n // bn) * -(-m // bm)
    if split_k is None:
        split_k = 1
        if m <= 16:  # few tiles: split K until about two programs per SM, each keeping >= 8 chunks
            split_k = max(1, min(2 * _sm_count(device) // max(n_tiles, 1), k // (8 * bk), 16))
    return bm, bn, bk, max(1, int(split_k)), use_dot, warps


def linear(lay: TritonLayout, x2: torch.Tensor, *, stored_only: bool = False) -> torch.Tensor:
    """The layer's output [M, out] (or the stored rows [M, n_stored] in storage order, `stored_only`) for x2 [M, K]
    in fp32 / fp16 / bf16, in x2's dtype."""
    if x2.dtype not in _FLOATS:
        raise TypeError(f"the Triton kernels take fp32 / fp16 / bf16 inputs, got {x2.dtype}")
    kernel = _kernel(interpreter_active())
    x2 = x2.contiguous()
    m, k = x2.shape
    width = lay.n_stored if stored_only else lay.out_features
    if m == 0:
        return x2.new_zeros(0, width)
    configs = [launch_config(m, g.rows, k, lay.group_size if g.grouped else None, x2.device, lay.split_k)
               for g in lay.groups]  # fmt: skip
    atomic = any(c[3] > 1 for c in configs)
    y = torch.zeros(m, width, dtype=torch.float32, device=x2.device) if atomic else torch.empty(
        m, width, dtype=x2.dtype, device=x2.device)  # fmt: skip
    if not stored_only and lay.pruned is not None:  # pruned rows output their bias (0 without)
        fill = 0.0 if lay.bias is None else lay.bias[lay.pruned].to(y.dtype).expand(m, -1)
        y[:, lay.pruned] = fill
    # the kernel reads bias[column]: the full bias by output row, or the stored rows' bias by storage position
    bias = lay.bias_stored if stored_only else lay.bias
    bias = bias if bias is not None else x2  # a dummy pointer when HAS_BIAS is off
    for g, (bm, bn, bk, split, use_dot, warps) in zip(lay.groups, configs):
        cols = lay.storage_cols[g.start : g.start + g.rows] if stored_only else g.cols
        planes = (16, 0) if g.bits == 16 else {8: (8, 0), 6: (4, 2), 4: (4, 0), 3: (2, 1), 2: (2, 0)}[g.bits]
        plane1_off = 0 if planes[1] == 0 else -(-k * planes[0] // 8)
        scale = g.scale if g.scale is not None else x2
        zero = g.zero if g.zero is not None else x2
        grid = (-(-g.rows // bn), -(-m // bm), split)
        kernel[grid](
            x2, g.w, scale, zero, cols, bias, y,
            m, g.rows, k, plane1_off, x2.stride(0), g.w.stride(0), scale.stride(0) if g.grouped else 1, y.stride(0),
            split, GS=lay.group_size if g.grouped else 1, P0=planes[0], P1=planes[1], GROUPED=g.grouped,
            HAS_BIAS=lay.bias is not None, USE_DOT=use_dot, IEEE=x2.dtype == torch.float32, ATOMIC=atomic,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )  # fmt: skip
    return y.to(x2.dtype) if atomic else y


__all__ = [
    "GEMV_MAX_TOKENS",
    "TritonLayout",
    "available",
    "build_layout",
    "interpreter_active",
    "launch_config",
    "linear",
    "unavailable_reason",
]
