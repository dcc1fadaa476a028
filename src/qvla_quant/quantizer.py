"""Per-row (per output channel) uniform quantization: the one definition every other part builds on.

A weight row w (one output channel of a linear layer, or one output filter of a conv flattened to a row) is
quantized at b in {2, 3, 4, 6, 8} bits (`QUANTIZED_BITS`) asymmetrically:

    q = clamp(round(w / s) + z, 0, 2^b - 1)          (unsigned integer codes, stored packed)
    w_hat = (q - z) * s                              (what the kernels compute)

with a per-row scale s (stored as fp32) and an integer zero point z (stored as uint8: 0 <= z <= 2^b - 1 <= 255,
exact). The reference dequantization below uses the stored s and z, so the packed runtime and the fake-quant
reference used for sensitivity see exactly the same w_hat.

Group-wise scales (optional, rows at b in `GROUPED_BITS` = {2, 3, 4}): the row is cut along K into groups of
`group_size` consecutive weights (g in `GROUP_SIZES` = {64, 128, 256}; the last group is shorter when g does not
divide K) and every group gets its own fp32 scale and uint8 zero point by the same rule, its own clip search
included (the row padded with zeros to a multiple of g and quantized as ceil(K / g) short rows: the padding lies in
every range, is reconstructed exactly and adds no error). A row is either per-row or grouped; a layer has one group
size (`qvla_quant.plan.LayerPlan.group_size`, per-row flags `grouped`).

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

Optional MSE-optimal clipping: the quantization range [min, max] of each row (of each group, when grouped) is
shrunk by a factor alpha from a grid, and the alpha with the lowest squared reconstruction error is kept.

Granularity (`GRANULARITIES`): "row" (the default, the method's per-output-channel scale and zero) or "tensor"
(the layer-wise RTN baseline of the paper's Table 3): one range [min, max] over all the rows quantized together,
one clip factor for all of them, hence one scale and one zero point shared by every row. The tensor variant keeps
the same storage (a scale and zero per row, all equal) so the packed runtime and kernels serve both; it needs
every quantized row of a layer at one bit-width (rows at 16 or 0 bits may be mixed in) and no grouped rows.

Row choices and their cost (what an allocator reads; one place)
----------------------------------------------------------------
`ROW_BITS` = (0, 2, 3, 4, 6, 8, 16) are all the bit-widths a row can be stored at; `BIT_CHOICES` = (0, 2, 4, 8, 16)
is the paper's candidate set and stays the default of calibration and allocation (so existing sensitivity stores,
plans and CLI defaults mean what they meant); 3 and 6 are opt-in. A row's choice is a `RowChoice(bits, grouped)`;
`row_choices(bits, group_size=g)` lists them in ascending cost (0, 2, 2g, 3, 3g, 4, 4g, 6, 8, 16: with g >= 64 a
grouped variant costs less than one more bit, at every K). Per row of K weights:

    plan bits (the budget; `row_plan_bits`):     b * K                       per-row or kept (16) row, 0 if pruned
                                                 b * K + 40 * (ceil(K/g) - 1)   grouped row: its extra fp32 scales
                                                                             and uint8 zeros are in the budget
    stored bytes (`row_storage_bytes`, format 3): code_bytes(K, b) + 5 + 4    per-row (codes, scale + zero, index)
                                                 code_bytes(K, b) + 5 * ceil(K/g) + 4      grouped
                                                 2 * K + 4 (16-bit row + index), 0 (pruned)

so stored bits = plan bits + the per-row overhead (72 bits per quantized row plus code padding, 32 per kept row)
for every choice alike. code_bytes(K, b) = sum over the bit planes p of b (`BIT_PLANES`: 3 = 2 + 1, 6 = 4 + 2) of
ceil(K * p / 8): exactly K * b / 8 when 8 divides K (see `qvla_quant.packed` for the layout).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# the bit vocabulary is defined in qvla_quant.bits; the quantizer's users have always imported it from here, so it
# stays importable from here (explicit re-exports)
from qvla_quant.bits import BIT_CHOICES as BIT_CHOICES
from qvla_quant.bits import GROUP_SIZES as GROUP_SIZES
from qvla_quant.bits import GROUPED_BITS as GROUPED_BITS
from qvla_quant.bits import KEEP_BITS as KEEP_BITS
from qvla_quant.bits import PRUNE_BITS as PRUNE_BITS
from qvla_quant.bits import QUANTIZED_BITS as QUANTIZED_BITS
from qvla_quant.bits import ROW_BITS as ROW_BITS
from qvla_quant.config import WeightQuantConfig

GRANULARITIES: tuple[str, ...] = ("row", "tensor")
SCALE_DTYPE = torch.float32  # per-row (per-group) scale s of a quantized row
ZERO_DTYPE = torch.uint8  # per-row (per-group) zero point z of a quantized row (an integer in [0, 2^b - 1])
SCALE_BYTES, ZERO_BYTES, ROW_INDEX_BYTES = 4, 1, 4
QPARAM_BITS = 8 * (SCALE_BYTES + ZERO_BYTES)  # one (scale, zero point) pair: 40 bits
# bit planes of a code (low plane first): every plane has a power-of-two field width, so it packs whole fields per
# byte (see `qvla_quant.packed`); 3 = 2 + 1 and 6 = 4 + 2 as llama.cpp's Q3_K / Q6_K split their codes
BIT_PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 6: (4, 2), 8: (8,)}


class RowChoice(NamedTuple):
    """How one row is stored: `bits` in ROW_BITS, `grouped` (group-wise scales, bits in GROUPED_BITS)."""

    bits: int
    grouped: bool = False

    @property
    def label(self) -> str:
        """The choice as text: "4" (per-row), "4g" (grouped), "0", "16"."""
        return f"{self.bits}g" if self.grouped else str(self.bits)

    @classmethod
    def parse(cls, label: str | int) -> RowChoice:
        text = str(label).strip()
        grouped = text.endswith("g")
        try:
            bits = int(text[:-1] if grouped else text)
        except ValueError:
            raise ValueError(f"row choice {label!r} is not a bit-width like '4' or a grouped one like '4g'") from None
        choice = cls(bits, grouped)
        choice.check()
        return choice

    def check(self) -> None:
        if self.bits not in ROW_BITS:
            raise ValueError(f"row bit-width {self.bits} is not in {ROW_BITS}")
        if self.grouped and self.bits not in GROUPED_BITS:
            raise ValueError(f"group-wise scales are for rows at {GROUPED_BITS} bits, not {self.bits}")


def row_choices(
    bits=ROW_BITS, *, group_size: int | None = None, grouped_bits=GROUPED_BITS, fan_in: int | None = None
) -> tuple[RowChoice, ...]:
    """The row choices over `bits` (per-row) plus, with a `group_size`, the grouped variant of every bit in
    `grouped_bits` among them; ascending cost (see the module docstring: (bits, grouped) order). With `fan_in`,
    grouped variants are left out where one group covers the row (K <= g: the same row as per-row)."""
    bits = sorted({int(b) for b in bits})
    out = [RowChoice(b) for b in bits]
    if group_size is not None:
        check_group_size(group_size)
        if fan_in is None or n_groups(fan_in, group_size) > 1:
            out += [RowChoice(b, True) for b in bits if b in GROUPED_BITS and b in set(grouped_bits)]
    for c in out:
        c.check()
    return tuple(sorted(out))


def row_choice_costs(fan_in: int, choices, group_size: int | None = None) -> list[int]:
    """`row_plan_bits` of one row of `fan_in` weights for each choice (RowChoice or label): the allocator's costs."""
    out = []
    for c in choices:
        c = c if isinstance(c, RowChoice) else RowChoice.parse(c)
        out.append(row_plan_bits(fan_in, c.bits, grouped=c.grouped, group_size=group_size if c.grouped else None))
    return out


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and (isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"group_size must be one of {GROUP_SIZES} (or None), got {group_size!r}")


def n_groups(fan_in: int, group_size: int) -> int:
    """Groups of a grouped row: ceil(K / g) (the last one shorter when g does not divide K)."""
    return -(-fan_in // group_size)


def code_bytes(fan_in: int, bits: int) -> int:
    """Bytes of the packed codes of one row at `bits` in QUANTIZED_BITS: sum of ceil(K * p / 8) over its planes."""
    if bits not in BIT_PLANES:
        raise ValueError(f"bits must be one of {QUANTIZED_BITS}, got {bits}")
    return sum((fan_in * p + 7) // 8 for p in BIT_PLANES[bits])


def row_plan_bits(fan_in: int, bits: int, *, grouped: bool = False, group_size: int | None = None) -> int:
    """What one row counts in the plan's average bits and the budget: b * K, plus 40 * (ceil(K/g) - 1) for a grouped
    row (its scales and zero points beyond the one pair every quantized row has)."""
    RowChoice(int(bits), bool(grouped)).check()
    if not grouped:
        return bits * fan_in
    if group_size is None:
        raise ValueError("a grouped row needs a group_size")
    check_group_size(group_size)
    return bits * fan_in + QPARAM_BITS * (n_groups(fan_in, group_size) - 1)


def row_storage_bytes(
    fan_in: int, bits: int, *, grouped: bool = False, group_size: int | None = None, kept_itemsize: int = 2
) -> int:
    """Stored bytes of one row in packed layout 3 (`qvla_quant.packed.row_bytes` is the same with a source dtype):
    codes + (scale, zero) per row or per group + int32 row index; 16-bit rows kept_itemsize * K + 4; pruned 0."""
    RowChoice(int(bits), bool(grouped)).check()
    if bits == PRUNE_BITS:
        return 0
    if bits == KEEP_BITS:
        return fan_in * kept_itemsize + ROW_INDEX_BYTES
    pairs = 1
    if grouped:
        if group_size is None:
            raise ValueError("a grouped row needs a group_size")
        check_group_size(group_size)
        pairs = n_groups(fan_in, group_size)
    return code_bytes(fan_in, bits) + pairs * (SCALE_BYTES + ZERO_BYTES) + ROW_INDEX_BYTES


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


def check_row_bits(row_bits) -> torch.Tensor:
    """row_bits as a long CPU tensor; ValueError naming the bit-widths outside ROW_BITS."""
    row_bits = torch.as_tensor(row_bits).detach().to("cpu", torch.long)
    bad = set(row_bits.unique().tolist()) - set(ROW_BITS)
    if bad:
        raise ValueError(f"row bit-widths {sorted(bad)} are not in {ROW_BITS}")
    return row_bits


def check_grouped(
    row_bits, grouped=None, group_size: int | None = None, granularity: str = "row"
) -> tuple[torch.Tensor | None, int | None]:
    """Validate per-row `grouped` flags against `row_bits` [out]; returns (bool tensor, group_size), both None
    when no row is grouped (the one canonical form of "no grouped rows", whatever group_size said)."""
    check_group_size(group_size)
    if grouped is None:
        return None, None
    row_bits = torch.as_tensor(row_bits).detach().to("cpu", torch.long)
    flags = torch.as_tensor(grouped).detach().to("cpu")
    if flags.shape != row_bits.shape:
        raise ValueError(f"grouped has shape {tuple(flags.shape)}, expected {tuple(row_bits.shape)} (one per row)")
    if flags.dtype != torch.bool:
        if not bool(((flags == 0) | (flags == 1)).all()):
            raise ValueError("grouped flags must be booleans (or 0/1)")
        flags = flags.to(torch.bool)
    if not bool(flags.any()):
        return None, None
    bad = sorted(set(row_bits[flags].tolist()) - set(GROUPED_BITS))
    if bad:
        raise ValueError(f"grouped rows must be at {GROUPED_BITS} bits; got grouped rows at {bad}")
    if group_size is None:
        raise ValueError(f"grouped rows need a group_size (one of {GROUP_SIZES})")
    if granularity != "row":
        raise ValueError(f"granularity {granularity!r} has one scale per tensor: it cannot have grouped rows")
    return flags, group_size


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


def _quantize(w: torch.Tensor, bits: int, config: WeightQuantConfig, per_tensor: bool):
    """quantize_rows on fp32 rows `w` [R, K] (no validation): (codes, scale, zero) as fp32 tensors."""
    qmax = (1 << bits) - 1
    # the range always contains 0 so that zero weights (and padding) are exact
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
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
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, qmax)
    return codes, scale, zero


def quantize_rows(
    rows: torch.Tensor,
    bits: int,
    config: WeightQuantConfig | None = None,
    *,
    granularity: str = "row",
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize every row of `rows` [R, K] to `bits` in QUANTIZED_BITS.

    granularity "tensor": one range and one clip factor over all of `rows` (every row gets the same scale/zero).
    group_size g (bits in GROUPED_BITS): one scale/zero per group of g weights along K, each with its own clip search.
    Returns (codes uint8 [R, K] in [0, 2^bits - 1], scale fp32 [R] (grouped: [R, ceil(K / g)]), zero uint8 [R]
    (grouped: [R, ceil(K / g)])).
    """
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"quantize_rows: bits must be one of {QUANTIZED_BITS}, got {bits}")
    check_granularity(granularity)
    config = config or WeightQuantConfig()
    w = rows.detach().float()
    if group_size is not None:
        check_group_size(group_size)
        RowChoice(bits, True).check()
        if granularity != "row":
            raise ValueError(f"granularity {granularity!r} has one scale per tensor: it cannot be grouped")
        r, k = w.shape
        g = n_groups(k, group_size)
        # zero padding to whole groups: 0 is in every range and is reconstructed exactly, so it adds no error
        wg = F.pad(w, (0, g * group_size - k)).reshape(r * g, group_size)
        codes, scale, zero = _quantize(wg, bits, config, per_tensor=False)
        codes = codes.reshape(r, g * group_size)[:, :k].contiguous()
        return codes.to(torch.uint8), scale.reshape(r, g).to(SCALE_DTYPE), zero.reshape(r, g).to(ZERO_DTYPE)
    codes, scale, zero = _quantize(w, bits, config, per_tensor=granularity == "tensor" and w.shape[0] > 0)
    return codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero.to(ZERO_DTYPE)


def expand_groups(t: torch.Tensor, fan_in: int, group_size: int) -> torch.Tensor:
    """Per-group values [R, G] -> per-weight [R, fan_in] (each value repeated over its group's columns)."""
    return t.repeat_interleave(group_size, dim=1)[:, :fan_in]


def dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """Reference dequantization: (codes - zero) * scale, in fp32 (grouped [R, G] scale/zero need `group_size`)."""
    if scale.dim() == 2:
        if group_size is None:
            raise ValueError("per-group scales [R, G] need the group_size")
        k = codes.shape[1]
        z, s = expand_groups(zero.float(), k, group_size), expand_groups(scale.float(), k, group_size)
        return (codes.float() - z) * s
    return (codes.float() - zero.float()[:, None]) * scale.float()[:, None]


def fake_quantize_rows(
    rows: torch.Tensor,
    bits: int,
    config: WeightQuantConfig | None = None,
    *,
    granularity: str = "row",
    group_size: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize every row at one bit-width; 16 returns the rows as stored (rounded to
    `kept_dtype(rows.dtype)`, in rows.dtype), 0 returns zeros (pruned); `group_size`: group-wise scales."""
    if bits == KEEP_BITS:
        return rows.detach().to(kept_dtype(rows.dtype), copy=True).to(rows.dtype)
    if bits == PRUNE_BITS:
        return torch.zeros_like(rows)
    codes, scale, zero = quantize_rows(rows, bits, config, granularity=granularity, group_size=group_size)
    return dequantize_rows(codes, scale, zero, group_size).to(rows.dtype)


def fake_quantize_weight(
    weight: torch.Tensor,
    row_bits: torch.Tensor,
    config: WeightQuantConfig | None = None,
    *,
    granularity: str = "row",
    group_size: int | None = None,
    grouped=None,
) -> torch.Tensor:
    """Quantize-dequantize a linear/conv weight with one bit-width per output row (`row_bits` [out]).

    Pruned rows (0 bits) become zero; the caller keeps the bias, so a pruned channel outputs its bias.
    Rows at one bit-width are quantized together (ascending row index), which matters only for
    granularity "tensor" (see the module docstring); the packed runtime groups rows the same way.
    grouped [out] (bool) with group_size: those rows get group-wise scales (see `check_grouped`).
    """
    rows = as_rows(weight)
    row_bits = torch.as_tensor(row_bits, dtype=torch.long)
    if row_bits.shape != (rows.shape[0],):
        raise ValueError(f"row_bits has shape {tuple(row_bits.shape)}, expected ({rows.shape[0]},)")
    row_bits = check_row_bits(row_bits)
    check_granularity(granularity, row_bits)
    flags, group_size = check_grouped(row_bits, grouped, group_size, granularity)
    if flags is None:
        flags = torch.zeros_like(row_bits, dtype=torch.bool)
    out = torch.empty_like(rows)
    for b in row_bits.unique().tolist():
        for is_grouped in (False, True):
            idx = ((row_bits == b) & (flags == is_grouped)).nonzero().squeeze(1).to(rows.device)
            if idx.numel():
                g = group_size if is_grouped else None
                out[idx] = fake_quantize_rows(rows[idx], b, config, granularity=granularity, group_size=g)
    return out.reshape(weight.shape)


def row_quantization_error(
    weight: torch.Tensor, bits: int, config: WeightQuantConfig | None = None, *, group_size: int | None = None
) -> torch.Tensor:
    """dW = Q_b(W) - W for every row at one bit-width (`group_size`: the grouped variant, bits in GROUPED_BITS),
    shaped like the weight's rows (rows [out, fan_in] for convs)."""
    rows = as_rows(weight)
    return fake_quantize_rows(rows, bits, config, group_size=group_size).float() - rows.detach().float()


def row_choice_error(
    weight: torch.Tensor,
    choice: RowChoice | str | int,
    config: WeightQuantConfig | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """`row_quantization_error` at one row choice ("4g" needs the layer's `group_size`): what a sensitivity column
    of that choice perturbs the rows by (0 and 16 included: -W and the 16-bit rounding)."""
    c = choice if isinstance(choice, RowChoice) else RowChoice.parse(choice)
    return row_quantization_error(weight, c.bits, config, group_size=group_size if c.grouped else None)


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
