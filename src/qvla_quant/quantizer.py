"""Per-row (per output channel) uniform quantization: the one definition every other part builds on.

A weight row w (one output channel of a linear layer, or one output filter of a conv flattened to a row) is
quantized at b in {2, 4, 8} bits asymmetrically:

    q = clamp(round(w / s) + z, 0, 2^b - 1)          (unsigned integer codes, stored packed)
    w_hat = (q - z) * s                              (what the kernels compute)

with a per-row scale s (stored as fp32) and an integer zero point z (stored as uint8: 0 <= z <= 2^b - 1 <= 255,
exact). The reference dequantization below uses the stored s and z, so the packed runtime and the fake-quant
reference used for sensitivity see exactly the same w_hat.

Why fp32 scales: an fp16 scale has no normal value below 6.1e-5, so a row whose range / (2^b - 1) is smaller
(an 8-bit row with std 5e-4 already is) got a scale clamped up to 6.1e-5 and used only a fraction of its codes
(38 of 256 in that example); fp16 subnormals avoid the clamp but lose mantissa bits. fp32 keeps every row's step
exactly range / (2^b - 1) down to 1e-38 at 2 more bytes per row than fp16; the uint8 zero point gives back one of
them (storage cost per quantized row: 4 + 1 bytes; see `qvla_quant.packed` for the whole per-row overhead).

b = 16 keeps the row as a 16-bit float (not quantized), in `kept_dtype(source dtype)`: a bf16 or fp16 source
keeps its own dtype (bit-exact), any wider source (fp32, fp64) is stored as bf16: bf16 has fp32's exponent range,
so no weight overflows (fp16 stops at 65504) or flushes to zero (fp16 below 6e-8), at 8 significant bits instead
of fp16's 11 (relative rounding <= 2^-9, finer than the step of an 8-bit row, about 2^-7 of its largest weight;
sensitivity still counts s(16) = 0). So a "16-bit" row takes 16 bits per weight whatever the source dtype, as the
plan's budget counts it; the reference `fake_quantize_rows(rows, 16)` applies the same rounding. Computation is in
the input's dtype (fp32 inputs: fp32 from the bf16 rows). b = 0 prunes the row: its output is the bias alone
(a pruned channel outputs a constant, so downstream LayerNorms and residuals keep seeing the mean contribution
instead of a hole). See `pruned_row_output` in the docs of `fake_quantize`.

Optional MSE-optimal clipping: the quantization range [min, max] of each row is shrunk by a factor alpha from a
grid, and the alpha with the lowest squared reconstruction error of that row is kept (per row).

Granularity (`GRANULARITIES`): "row" (the default, the method's per-output-channel scale and zero) or "tensor"
(the layer-wise RTN baseline of the paper's Table 3): one range [min, max] over all the rows quantized together,
one clip factor for all of them, hence one scale and one zero point shared by every row. The tensor variant keeps
the same storage (a scale and zero per row, all equal) so the packed runtime and kernels serve both; it needs
every quantized row of a layer at one bit-width (rows at 16 or 0 bits may be mixed in).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

BIT_CHOICES: tuple[int, ...] = (0, 2, 4, 8, 16)
QUANTIZED_BITS: tuple[int, ...] = (2, 4, 8)
KEEP_BITS = 16
PRUNE_BITS = 0
GRANULARITIES: tuple[str, ...] = ("row", "tensor")
SCALE_DTYPE = torch.float32  # per-row scale s of a quantized row
ZERO_DTYPE = torch.uint8  # per-row zero point z of a quantized row (an integer in [0, 2^b - 1])


def kept_dtype(source_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of a 16-bit (kept) row of a `source_dtype` weight: bf16/fp16 as is, anything wider as bf16."""
    if not source_dtype.is_floating_point:
        raise ValueError(f"kept rows need a floating source dtype, got {source_dtype}")
    return source_dtype if torch.empty((), dtype=source_dtype).element_size() == 2 else torch.bfloat16


def check_granularity(granularity: str, row_bits=None) -> None:
    """Raise ValueError unless `granularity` is known and, for "tensor", the quantized rows share one bit-width."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor" and row_bits is not None:
        quantized = sorted({int(b) for b in torch.as_tensor(row_bits).tolist()} & set(QUANTIZED_BITS))
        if len(quantized) > 1:
            raise ValueError(
                f"granularity 'tensor' shares one scale/zero over the layer, so its quantized rows need one "
                f"bit-width; got {quantized}. Use granularity 'row' for mixed-precision layers."
            )


@dataclass(frozen=True)
class WeightQuantConfig:
    """How weight rows are quantized.

    clip_search: search a per-row shrink factor of the [min, max] range that minimizes the row's squared error.
    clip_grid: number of shrink factors tried, evenly spaced in [clip_min_ratio, 1].
    """

    clip_search: bool = True
    clip_grid: int = 20
    clip_min_ratio: float = 0.5

    def __post_init__(self):
        if self.clip_grid < 1:
            raise ValueError(f"clip_grid must be >= 1, got {self.clip_grid}")
        if not 0.0 < self.clip_min_ratio <= 1.0:
            raise ValueError(f"clip_min_ratio must be in (0, 1], got {self.clip_min_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WeightQuantConfig:
        return cls(**d)


@dataclass(frozen=True)
class ActivationQuantConfig:
    """One activation bit-width for every quantized layer (the paper's branch-free uniform activations).

    bits = 16: activations stay in floating point (A16). bits = 8: per-token dynamic asymmetric int8 (A8), the
    input of every quantized layer is fake-quantized per row of the flattened input (per token).
    """

    bits: int = 16

    def __post_init__(self):
        if self.bits not in (8, 16):
            raise ValueError(f"activation bits must be 8 or 16, got {self.bits}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ActivationQuantConfig:
        return cls(**d)


@dataclass(frozen=True)
class QuantConfig:
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict(), "activation": self.activation.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(WeightQuantConfig.from_dict(d["weight"]), ActivationQuantConfig.from_dict(d["activation"]))


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """View a linear weight [out, in] or conv weight [out, in, *k] as rows [out, fan_in]."""
    return weight.reshape(weight.shape[0], -1)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and integer zero point (as fp32 values) for ranges [lo, hi] that contain 0.

    The scale is exactly (hi - lo) / (2^b - 1): no lower clamp but fp32's smallest normal number, which only keeps
    an all-zero row (lo = hi = 0) from dividing by zero (its codes are all z = 0)."""
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_rows(
    rows: torch.Tensor, bits: int, config: WeightQuantConfig | None = None, *, granularity: str = "row"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize every row of `rows` [R, K] to `bits` in {2, 4, 8}.

    granularity "tensor": one range and one clip factor over all of `rows` (every row gets the same scale/zero).
    Returns (codes uint8 [R, K] in [0, 2^bits - 1], scale fp32 [R], zero uint8 [R]).
    """
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"quantize_rows: bits must be one of {QUANTIZED_BITS}, got {bits}")
    check_granularity(granularity)
    config = config or WeightQuantConfig()
    w = rows.detach().float()
    qmax = (1 << bits) - 1
    # the range always contains 0 so that zero weights (and padding) are exact
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    per_tensor = granularity == "tensor" and w.shape[0] > 0
    if per_tensor:
        lo, hi = lo.amin().expand_as(lo), hi.amax().expand_as(hi)

    if config.clip_search and config.clip_grid > 1:
        best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(1.0, config.clip_min_ratio, config.clip_grid).tolist():
            c_lo, c_hi = lo * ratio, hi * ratio
            scale, zero = _scale_zero(c_lo, c_hi, bits)
            q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, qmax)
            err = ((q - zero[:, None]) * scale[:, None] - w).pow(2).sum(dim=1)
            if per_tensor:  # one clip factor for the whole tensor: compare the total error
                err = err.sum().expand_as(err)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        lo, hi = best_lo, best_hi

    scale, zero = _scale_zero(lo, hi, bits)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, qmax).to(torch.uint8)
    return codes, scale.to(SCALE_DTYPE), zero.to(ZERO_DTYPE)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Reference dequantization: (codes - zero) * scale, in fp32."""
    return (codes.float() - zero.float()[:, None]) * scale.float()[:, None]


def fake_quantize_rows(
    rows: torch.Tensor, bits: int, config: WeightQuantConfig | None = None, *, granularity: str = "row"
) -> torch.Tensor:
    """Quantize-dequantize every row at one bit-width; 16 returns the rows as stored (rounded to
    `kept_dtype(rows.dtype)`, in rows.dtype), 0 returns zeros (pruned)."""
    if bits == KEEP_BITS:
        return rows.detach().to(kept_dtype(rows.dtype), copy=True).to(rows.dtype)
    if bits == PRUNE_BITS:
        return torch.zeros_like(rows)
    codes, scale, zero = quantize_rows(rows, bits, config, granularity=granularity)
    return dequantize_rows(codes, scale, zero).to(rows.dtype)


def fake_quantize_weight(
    weight: torch.Tensor,
    row_bits: torch.Tensor,
    config: WeightQuantConfig | None = None,
    *,
    granularity: str = "row",
) -> torch.Tensor:
    """Quantize-dequantize a linear/conv weight with one bit-width per output row (`row_bits` [out]).

    Pruned rows (0 bits) become zero; the caller keeps the bias, so a pruned channel outputs its bias.
    Rows at one bit-width are quantized together (ascending row index), which matters only for
    granularity "tensor" (see the module docstring); the packed runtime groups rows the same way.
    """
    rows = as_rows(weight)
    row_bits = torch.as_tensor(row_bits, dtype=torch.long)
    if row_bits.shape != (rows.shape[0],):
        raise ValueError(f"row_bits has shape {tuple(row_bits.shape)}, expected ({rows.shape[0]},)")
    bad = set(row_bits.unique().tolist()) - set(BIT_CHOICES)
    if bad:
        raise ValueError(f"row bit-widths {sorted(bad)} are not in {BIT_CHOICES}")
    check_granularity(granularity, row_bits)
    out = torch.empty_like(rows)
    for b in row_bits.unique().tolist():
        idx = (row_bits == b).nonzero().squeeze(1)
        out[idx] = fake_quantize_rows(rows[idx], b, config, granularity=granularity)
    return out.reshape(weight.shape)


def row_quantization_error(
    weight: torch.Tensor, bits: int, config: WeightQuantConfig | None = None
) -> torch.Tensor:
    """dW = Q_b(W) - W for every row at one bit-width, shaped like the weight (rows [out, fan_in] for convs)."""
    rows = as_rows(weight)
    return fake_quantize_rows(rows, bits, config).float() - rows.detach().float()


def fake_quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic asymmetric fake quantization of an activation [..., K] (A8); 16 returns x."""
    if bits >= 16:
        return x
    qmax = (1 << bits) - 1
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    # straight-through: identical values forward, gradient of identity backward (for the first-order proxy)
    return x + ((q - zero) * scale - x).detach()
