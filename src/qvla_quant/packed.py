"""Packed mixed-precision linear layer: the real storage of a QVLA plan, and its torch (CPU) forward.

One class, `PackedLinear`, holds one nn.Linear or nn.Conv2d whose output rows carry bit-widths in
{0, 2, 3, 4, 6, 8, 16} (`quantizer.ROW_BITS`), rows at 2, 3 or 4 bits optionally with group-wise scales. A Conv2d is
a linear map over its output channels: its filter [in/groups, kh, kw] is one row of K = in/groups * kh * kw weights,
flattened row-major exactly like `weight.reshape(out, -1)`.

Storage layout, format version 3 (every tensor is a buffer, so `state_dict()` and the safetensors artifact hold
exactly this)
-----------------------------------------------------------------------------------------------------------------
Stored rows are grouped by storage kind in the fixed order 8, 6, 4, 3, 2, 4g, 3g, 2g, 16 (`STORAGE_ORDER`; "4g":
4-bit rows with group-wise scales); pruned rows (0 bits) are not stored. Inside a group rows keep ascending
original output index. K = in_features (fan-in of one row); g = the layer's group size (`LayerPlan.group_size`, 64,
128 or 256) and G = ceil(K / g) groups per grouped row (G = 0 in a layer without grouped rows).

    buffer      dtype         shape                          content
    qweight_b   uint8         [rows_b, code_bytes(K, b)]     b in 8, 6, 4, 3, 2: the codes of each row, bit plane
                                                             after bit plane (below)
    scale_b     float32       [rows_b]                       per-row scale s (fp32: every row keeps its full
                                                             resolution, see `qvla_quant.quantizer`)
    zero_b      uint8         [rows_b]                       per-row zero point z, an integer in [0, 2^b - 1]
    qweight_bg  uint8         [rows_bg, code_bytes(K, b)]    b in 4, 3, 2: grouped rows, codes as in qweight_b
    scale_bg    float32       [rows_bg, G]                   scale of group j = columns [j g, min((j + 1) g, K))
    zero_bg     uint8         [rows_bg, G]                   zero point of group j, in [0, 2^b - 1]
    kept        kept dtype    [rows_16, K]                   16-bit rows, unquantized: kept dtype =
                                                             `quantizer.kept_dtype(source dtype)`, i.e. bf16 for
                                                             fp32 (or wider) sources, the source dtype for bf16
                                                             and fp16 sources (bit-exact)
    row_index   int32         [stored rows]                  original output index of every stored row, in
                                                             the group order above (concatenated)
    bias        source dtype  [out_features]                 only if the source layer has a bias: the FULL
                                                             bias, pruned rows included

Codes and bit planes. A b-bit code is split into planes of power-of-two widths, low bits first
(`quantizer.BIT_PLANES`): 8 = (8), 6 = (4, 2), 4 = (4), 3 = (2, 1), 2 = (2). A packed row is its planes one after
the other; a plane of width p holds 8 / p columns per byte, column (8/p) j + i in bits p i .. p i + p - 1 of
byte j (column 0 in the lowest bits), its last byte padded with code 0: ceil(K p / 8) bytes. So the row stride is

    code_bytes(K, b) = sum over the planes p of b of ceil(K p / 8)
                     = K (8 bits), ceil(K/2) (4), ceil(K/4) (2), ceil(K/4) + ceil(K/8) (3), ceil(K/2) + ceil(K/4) (6)

exactly K b / 8 when 8 divides K, and q = low field | (high field << width of the low plane). The 2-, 4- and
8-bit rows are byte for byte those of layout 2. Why planes for 3 and 6 bits: no field ever straddles a byte, so a
kernel unpacks every plane with the same shift-and-mask as int2/int4 (and int1), planes stay aligned to a row's
byte offsets, and the storage is exactly b bits per weight (10 codes per 32-bit word would take 3.2 bits; 8 codes
per 3 bytes would make fields cross bytes). llama.cpp's Q3_K (2 low bits + a high-bit plane) and Q6_K (4 + 2) split
their codes the same way. 6 bits came at no extra machinery, so it is in: it sits between 4 and 8, which lets an
allocator free 2 bits from a row whose 8-bit error is far below everything else (one more GEMM per layer that uses
it, one more sensitivity column).

Bytes per row, exactly (`row_bytes`, `predicted_weight_bytes`, `quantizer.row_storage_bytes`;
`PackedLinear.weight_bytes()` measures the same):

    quantized row at b:               code_bytes(K, b) + 9          (codes + 4 fp32 scale + 1 uint8 zero + 4 int32
                                                                    index)
    grouped row at b in {2, 3, 4}:    code_bytes(K, b) + 5 G + 4    (codes + G (scale, zero) pairs + 4 index)
    kept row (16 bits):               2 * K + 4                     (16-bit values + 4 int32 index)
    pruned row (0 bits):              0
    (bias not counted: it is not a weight; it is stored in full, in the source dtype)

The plan's average bits count b * K per row and, for a grouped row, its 40 (G - 1) bits of extra scales and zero
points (`quantizer.row_plan_bits`: the groups' overhead is in the budget), so the stored bits per weight are the
plan's average plus the per-row overhead: 72 bits per quantized row, grouped or not (plus the padding of the last
byte of each plane), and 32 bits per kept row, divided by the weights (`overhead_bits_per_weight`). At K = 128 a
4-bit row takes 64 + 9 bytes = 4.5625 bits per weight: overhead 0.5625; a grouped 4-bit row at g = 64 (G = 2)
64 + 14 bytes = 4.875 bits, of which the plan counts 4.3125.

Format version 2 (artifacts written before 3- and 6-bit rows and groups; they still load): only the 8, 4, 2 and 16
groups, byte for byte as above; such a layer loads with empty 6, 3 and grouped groups (the same tensors, the same
outputs).

Format version 1 (artifacts written before layout 2; they still load): scale_b and zero_b float16 (scales
clamped to >= 6.1e-5) and kept rows in the source dtype: ceil(K * b / 8) + 8 bytes per quantized row and
K * itemsize(source) + 4 per kept row. A version-1 artifact loads with its scales widened to fp32 and its zero
points narrowed to uint8 (both exact: the outputs are the same) and its kept rows as stored, in the source dtype
(`repack_kept` rounds them to the version-2 kept dtype, which changes those rows; `save_artifact` asks for it).

A kernel runs one GEMM per group and writes its output columns to row_index[off : off + rows], the offsets the
cumulated group sizes in `STORAGE_ORDER` (MixLLM-style).

Every row of a packed tensor starts on a byte boundary; a kernel must mask columns >= K in each plane's last byte.
Empty groups are stored as zero-row tensors so the set of buffer names and their meaning never depends on the plan
(rows_b = buffer.shape[0]).

Math (identical to `qvla_quant.quantizer`, which the fake-quant reference uses):
    w[i, k]      = (q[i, k] - z[i]) * s[i]          in fp32 from the fp32 s and uint8 z, then cast to the compute
                                                    dtype (grouped: z and s of the group of column k); a kept row is
                                                    its stored 16-bit value
    y[..., o]    = x @ w[i] + bias[o]              for the stored row i with row_index[i] = o
    y[..., o]    = bias[o]   (0 without bias)       for a pruned row o: a pruned channel outputs a constant, so
                                                    downstream norms and residuals keep its mean contribution
With A8 (`config.activation.bits == 8`) x is first fake-quantized per token (per row of the flattened [N, K]
input; for a conv, per patch = per column of `F.unfold`), exactly as `fake_quantize_activation` does.

Layer-wise RTN (granularity "tensor") uses this same format: scale_b / zero_b hold one value repeated per row.
(Layer-wise storage could drop the per-row scale and zero; it does not, so the overhead above holds for it too.)

Why bf16 and not fp16 for the kept rows of an fp32 model: bf16 has fp32's exponent range (no overflow above
65504, no flush to zero below 6e-8) at 8 significant bits; fp16 has 11 but would silently break outlier weights
and tiny ones. A bf16 or fp16 model keeps its own dtype (converting between the two loses range or mantissa).

CPU forward and the dequantization cache
----------------------------------------
Default, per call: the stored rows (kept rows included) are dequantized in blocks of ~2 MiB of fp32 and each block
is multiplied right away (it stays in cache), accumulating, scaling and adding the bias in fp32 whatever the input
dtype (fp32 inputs compute in fp32 from the bf16 kept rows; 16-bit inputs are rounded once, at the end); the
output columns are then scattered by `row_index` (`index_copy_`) into an output pre-filled with the bias. It
equals the reference up to the order of roundings (tests: max error <= 1e-5 x max |output| in fp32). Cost on
a shared 2-core CPU (bench/bench_packed.py): about 3.5-7x the time of an fp32 nn.Linear at 1 token and 1.1-2x at
256 tokens (dequantizing the whole layer first instead: 10x slower again at 1 token); peer libraries: 10-50x.

`cache_dequantized=True` (or `set_dequantized_cache(model, True)`): dequantize once, in the compute dtype, and
keep it: the speed of nn.Linear, at the memory of a full-precision copy of every stored row on top of the packed
buffers (in fp32 that is more than the bf16 source model). The cache and the conv path compute in the input's
dtype. Default off: the packed weights are the point of the format; switch it on for CPU evaluation runs with
memory to spare. The cache is never saved.

Kernels (`qvla_quant.kernels`). By default (`QVLA_KERNELS` unset or "auto") a CPU with fast bf16 (avx512_bf16
or amx_bf16) runs the packed layers through torch's int8 / int4 CPU matmul kernels on a repacked resident layout
(built at the first call, never saved: about 8 bits per weight for 8- and 6-bit rows, 4 + 32/g for 4-, 3- and 2-bit
rows), with bf16 activations: ~3e-3 relative error against the fp32 math below, bounded by
`kernels.reference.error_bound`; a CUDA device with triton runs the Triton kernels on the stored buffers directly.
`QVLA_KERNELS=reference` (or `transforms.set_kernels(model, "reference")`, or a layer's `kernels` attribute) keeps
the exact path described here; the test suite uses it for the format's 1e-5 contract.

3- and 6-bit rows go the same way, their planes unpacked into codes block by block ((q - z) exact in fp32, the
scale applied to the output); grouped rows are dequantized block by block in fp32 with their group scales and
zero points (the reference's two roundings) and multiplied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qvla_quant import kernels
from qvla_quant.codes import group_suffix, pack_codes, unpack_codes
from qvla_quant.config import QuantConfig
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import (
    BIT_PLANES,
    ROW_BITS,
    ROW_INDEX_BYTES,
    SCALE_BYTES,
    SCALE_DTYPE,
    ZERO_BYTES,
    ZERO_DTYPE,
    RowChoice,
    as_rows,
    check_granularity,
    check_grouped,
    check_row_bits,
    code_bytes,
    expand_groups,
    fake_quantize_activation,
    n_groups,
    quantize_rows,
)
from qvla_quant.quantizer import kept_dtype as _kept_dtype

PACKED_FORMAT_VERSION = 3
PACKED_READ_VERSIONS: tuple[int, ...] = (1, 2, 3)  # layouts `qvla_quant.artifact` loads (see the module docstring)
PACKED_GROUPS: tuple[int, ...] = (8, 6, 4, 3, 2)  # per-row quantized groups, in storage order
GROUPED_PACKED_GROUPS: tuple[int, ...] = (4, 3, 2)  # grouped ("4g" ...) groups, in storage order, after them
LAYOUT_2_GROUPS: tuple[int, ...] = (8, 4, 2)  # the quantized groups of layouts 1 and 2
# every stored group in storage order (the kept 16-bit group last); its buffers are named by `group_suffix`
STORAGE_ORDER: tuple[RowChoice, ...] = (
    *(RowChoice(b) for b in PACKED_GROUPS),
    *(RowChoice(b, True) for b in GROUPED_PACKED_GROUPS),
    RowChoice(16),
)
QUANTIZED_STORAGE: tuple[RowChoice, ...] = STORAGE_ORDER[:-1]
# rows dequantized per block in the per-call forward: 64 rows x 8192 fp32 = 2 MiB, fits a core's L2
DEQUANT_BLOCK_BYTES = 2 << 20
# storage beyond the plan's bits, per row (format version 2 and 3; see the module docstring)
QUANTIZED_ROW_OVERHEAD_BYTES = SCALE_BYTES + ZERO_BYTES + ROW_INDEX_BYTES  # fp32 scale, uint8 zero, int32 row_index
GROUP_OVERHEAD_BYTES = SCALE_BYTES + ZERO_BYTES  # per extra group of a grouped row (in the plan's bits)
KEPT_ROW_OVERHEAD_BYTES = ROW_INDEX_BYTES  # int32 row_index
# attribute that `quantize_model` sets on the model it returns: the source model's fingerprint (see artifact.py)
SOURCE_FINGERPRINT_ATTR = "qvla_source_fingerprint"


# ---------------------------------------------------------------------------------------------------------------
# the packed layer


@dataclass(frozen=True)
class ConvGeometry:
    """What F.conv2d needs besides the weight; taken from the source nn.Conv2d."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    reversed_padding: tuple[int, ...]  # nn.Conv2d._reversed_padding_repeated_twice, for non-"zeros" modes

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> ConvGeometry:
        return cls(
            tuple(conv.kernel_size),
            tuple(conv.stride),
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.dilation),
            conv.groups,
            conv.padding_mode,
            tuple(conv._reversed_padding_repeated_twice),
        )


def _bits_tensor(row_bits) -> torch.Tensor:
    return check_row_bits(row_bits)


def _storage_masks(bits: torch.Tensor, grouped: torch.Tensor | None) -> dict[RowChoice, torch.Tensor]:
    """Rows of every storage group (bool masks over the output rows), in STORAGE_ORDER."""
    flags = torch.zeros_like(bits, dtype=torch.bool) if grouped is None else grouped
    return {c: (bits == c.bits) & (flags == c.grouped) for c in STORAGE_ORDER}


class PackedLinear(nn.Module):
    """A Linear/Conv2d stored as row groups of int8 / int6 / int4 / int3 / int2 codes (per-row scales, or group-wise
    for int4 / int3 / int2), 16-bit rows and pruned rows.

    See the module docstring for the exact layout. Build it with `from_float` (quantizes a float module) or with
    the constructor (empty buffers of the right shapes, e.g. on the meta device, to be filled by
    `load_state_dict(..., assign=True)`). `dtype` is the source layer's dtype (that of `weight` and `bias`);
    `kept_dtype` that of the kept rows, `quantizer.kept_dtype(dtype)` unless given (format-1 layers: `dtype`).
    `group_size` / `grouped` [out] (bool): group-wise scales for the flagged rows (as in `LayerPlan`); both None
    when no row is grouped (`group_size` is then None whatever was given).
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        row_bits,
        config: QuantConfig | None = None,
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        granularity: str = "row",
        conv: ConvGeometry | None = None,
        device: torch.device | str | None = None,
        cache_dequantized: bool = False,
        kept_dtype: torch.dtype | None = None,
        group_size: int | None = None,
        grouped=None,
    ):
        super().__init__()
        self._source_dtype = dtype
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.out_features = self.weight_shape[0]
        self.in_features = math.prod(self.weight_shape[1:])
        self.config = config or QuantConfig()
        self.granularity = granularity
        self.conv = conv
        self.cache_dequantized = cache_dequantized
        self._cache: tuple[tuple, torch.Tensor] | None = None
        if (conv is None) != (len(self.weight_shape) == 2):
            raise ValueError(f"weight shape {self.weight_shape} does not fit a {'conv' if conv else 'linear'} layer")
        if conv is not None and self.config.activation.bits == 8:
            # the A8 conv path quantizes per patch through F.unfold, which knows zero padding with explicit sizes
            if isinstance(conv.padding, str) and conv.padding != "valid":
                raise NotImplementedError(f"A8 conv with padding={conv.padding!r} is not supported; use int padding")
            if conv.groups != 1:
                raise NotImplementedError("A8 conv with groups > 1 is not supported")

        bits = _bits_tensor(row_bits)
        if bits.shape != (self.out_features,):
            raise ValueError(f"row_bits has shape {tuple(bits.shape)}, expected ({self.out_features},)")
        check_granularity(granularity, bits)
        flags, self.group_size = check_grouped(bits, grouped, group_size, granularity)
        k = self.in_features
        n_grp = n_groups(k, self.group_size) if self.group_size else 0
        factory = {"device": device}
        masks = _storage_masks(bits, flags)
        for c in QUANTIZED_STORAGE:
            n, sfx = int(masks[c].sum()), group_suffix(c)
            qshape = (n, n_grp) if c.grouped else (n,)
            self.register_buffer(f"qweight_{sfx}", torch.empty(n, code_bytes(k, c.bits), dtype=torch.uint8, **factory))
            self.register_buffer(f"scale_{sfx}", torch.empty(qshape, dtype=SCALE_DTYPE, **factory))
            self.register_buffer(f"zero_{sfx}", torch.empty(qshape, dtype=ZERO_DTYPE, **factory))
        kept = kept_dtype or _kept_dtype(dtype)
        self.register_buffer("kept", torch.empty(int((bits == 16).sum()), k, dtype=kept, **factory))
        index = torch.cat([masks[c].nonzero().squeeze(1) for c in STORAGE_ORDER]).to(torch.int32)
        self.register_buffer("row_index", index.to(device) if str(device) != "meta" else index.to("meta"))
        self.register_buffer("bias", torch.empty(self.out_features, dtype=dtype, **factory) if bias else None)

    # ---- construction from a float module
    @classmethod
    def from_float(
        cls,
        module: nn.Linear | nn.Conv2d,
        row_bits,
        config: QuantConfig | None = None,
        *,
        granularity: str = "row",
        cache_dequantized: bool = False,
        group_size: int | None = None,
        grouped=None,
        qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PackedLinear:
        """Quantize `module` with one bit-width per output row (`row_bits` [out]) into the packed format; rows
        flagged in `grouped` get group-wise scales of `group_size` weights along K.

        qparams: explicit (scale, zero) of the layer instead of the ones `quantize_rows` computes from the weights
        (GPTQ's, chosen before its error compensation moved the rows): [out] for per-row rows or [out, ceil(K / g)]
        for grouped rows, indexed by original row (entries of 16-bit and pruned rows are ignored); each code is
        then clamp(round(w / s) + z, 0, 2^b - 1) (`_codes_from_qparams`)."""
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"PackedLinear.from_float takes nn.Linear or nn.Conv2d, got {type(module).__name__}")
        weight = module.weight.detach()
        if weight.is_meta:
            raise ValueError("cannot quantize a module whose weights are on the meta device: load its weights first")
        config = config or QuantConfig()
        packed = cls(
            weight.shape,
            row_bits,
            config,
            bias=module.bias is not None,
            dtype=weight.dtype,
            granularity=granularity,
            conv=ConvGeometry.from_module(module) if isinstance(module, nn.Conv2d) else None,
            device=weight.device,
            cache_dequantized=cache_dequantized,
            group_size=group_size,
            grouped=grouped,
        )
        bits = _bits_tensor(row_bits)
        masks = _storage_masks(bits, packed.row_grouped() if packed.group_size else None)
        rows = as_rows(weight)
        with torch.no_grad():
            for c in QUANTIZED_STORAGE:
                idx = masks[c].nonzero().squeeze(1).to(weight.device)
                if idx.numel() and qparams is not None:
                    codes, scale, zero = _codes_from_qparams(
                        rows[idx], c.bits, qparams, idx, packed.group_size if c.grouped else None
                    )
                elif idx.numel():
                    # same grouping as fake_quantize_weight (ascending rows), so "tensor" granularity matches too
                    codes, scale, zero = quantize_rows(
                        rows[idx], c.bits, config.weight, granularity=granularity,
                        group_size=packed.group_size if c.grouped else None,
                    )  # fmt: skip
                if idx.numel():
                    sfx = group_suffix(c)
                    getattr(packed, f"qweight_{sfx}").copy_(pack_codes(codes, c.bits))
                    getattr(packed, f"scale_{sfx}").copy_(scale)
                    getattr(packed, f"zero_{sfx}").copy_(zero)
            # rounds an fp32 source to bf16 (as fake_quantize_rows does)
            packed.kept.copy_(rows[(bits == 16).to(weight.device)])
            if module.bias is not None:
                packed.bias.copy_(module.bias.detach())
        return packed

    # ---- introspection
    @property
    def source_dtype(self) -> torch.dtype:
        """The replaced layer's dtype (of `weight` and `bias`; the kept rows are 16-bit: `kept.dtype`)."""
        return self._source_dtype

    @property
    def weight(self) -> torch.Tensor:
        """A data-free stand-in for the replaced module's weight: right shape and dtype, on the meta device.

        Model code reads `layer.weight.dtype` / `.shape` to cast inputs (SigLIP's patch embedding does, on every
        forward); that keeps working. Any arithmetic with it fails loudly (meta tensors hold no data), so nothing
        can silently compute with a wrong weight. The real weight is `dequantized_weight()`.
        """
        return torch.empty(self.weight_shape, dtype=self.source_dtype, device="meta")

    def _group_rows(self, c: RowChoice) -> int:
        return self.kept.shape[0] if c.bits == 16 else getattr(self, f"qweight_{group_suffix(c)}").shape[0]

    def storage_groups(self) -> list[tuple[RowChoice, int]]:
        """(storage group, stored rows) in STORAGE_ORDER, empty groups included."""
        return [(c, self._group_rows(c)) for c in STORAGE_ORDER]

    def group_sizes(self) -> dict[int | str, int]:
        """Stored rows per per-row bit-width (int keys 8, 6, 4, 3, 2, 16), per grouped one ("4g", "3g", "2g"),
        and pruned rows under 0."""
        sizes: dict[int | str, int] = {}
        for c, n in self.storage_groups():
            sizes[c.label if c.grouped else c.bits] = n
        sizes[0] = self.out_features - sum(sizes.values())
        return sizes

    def _row_choice_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        bits = torch.zeros(self.out_features, dtype=torch.long)
        grouped = torch.zeros(self.out_features, dtype=torch.bool)
        index = self.row_index.long().cpu()
        start = 0
        for c, n in self.storage_groups():
            bits[index[start : start + n]] = c.bits
            grouped[index[start : start + n]] = c.grouped
            start += n
        return bits, grouped

    def row_bits(self) -> torch.Tensor:
        """Bits per original output row (long [out]), derived from the stored groups."""
        return self._row_choice_codes()[0]

    def row_grouped(self) -> torch.Tensor:
        """Whether each original output row has group-wise scales (bool [out])."""
        return self._row_choice_codes()[1]

    def average_bits(self) -> float:
        """Bits per weight as the plan counts them (b * K per row; a grouped row + its extra scales and zeros)."""
        bits, grouped = self._row_choice_codes()
        extra = 0
        if self.group_size:
            extra = GROUP_OVERHEAD_BYTES * 8 * (n_groups(self.in_features, self.group_size) - 1) * int(grouped.sum())
        return (float(bits.sum()) * self.in_features + extra) / (self.out_features * self.in_features)

    def stored_bits_per_weight(self) -> float:
        """Bits per weight as stored: 8 * weight_bytes() / (out_features * in_features)."""
        return 8.0 * self.weight_bytes() / (self.out_features * self.in_features)

    def overhead_bits_per_weight(self) -> float:
        """Stored bits per weight beyond the plan's average (scales, zeros, row index, byte padding)."""
        return self.stored_bits_per_weight() - self.average_bits()

    def weight_bytes(self) -> int:
        """Bytes actually stored for the weight: packed codes + scales + zeros + kept rows + row_index.
        A format-2 layer: exactly `predicted_weight_bytes(plan of this layer, source_dtype)`.

        The bias is not a weight and is not counted (see `bias_bytes`); neither is the optional dequantization
        cache (a runtime choice, see `cache_bytes`).
        """
        names = [f"{p}_{group_suffix(c)}" for c in QUANTIZED_STORAGE for p in ("qweight", "scale", "zero")]
        names += ["kept", "row_index"]
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def bias_bytes(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * self.bias.element_size()

    def cache_bytes(self) -> int:
        return 0 if self._cache is None else self._cache[1].numel() * self._cache[1].element_size()

    def validate(self) -> None:
        """Check that the buffers are a consistent packed layer (after loading from a file)."""
        n_stored = sum(n for _, n in self.storage_groups())
        problems = []
        if self.row_index.shape != (n_stored,):
            problems.append(f"row_index has {self.row_index.numel()} entries for {n_stored} stored rows")
        else:
            idx = self.row_index.long()
            if n_stored and (idx.min() < 0 or idx.max() >= self.out_features or idx.unique().numel() != n_stored):
                problems.append("row_index is not a set of distinct output rows")
        n_grp = n_groups(self.in_features, self.group_size) if self.group_size else 0
        for c in QUANTIZED_STORAGE:
            b, sfx = c.bits, group_suffix(c)
            q, s, z = (getattr(self, f"{p}_{sfx}") for p in ("qweight", "scale", "zero"))
            qshape = (q.shape[0], n_grp) if c.grouped else (q.shape[0],)
            if q.shape[1] != code_bytes(self.in_features, b) or s.shape != qshape or z.shape != s.shape:
                problems.append(f"int{sfx} group has inconsistent shapes {tuple(q.shape)}, {tuple(s.shape)}")
            elif s.numel() and not s.is_meta:
                if not bool(torch.isfinite(s).all() and (s > 0).all()):
                    problems.append(f"int{sfx} group has scales that are not finite and positive")
                if int(z.max()) > (1 << b) - 1:
                    problems.append(f"int{sfx} group has zero points above {(1 << b) - 1}")
        if problems:
            raise ValueError("inconsistent packed layer: " + "; ".join(problems))

    def extra_repr(self) -> str:
        g = self.group_sizes()
        kind = f"conv{tuple(self.weight_shape)}" if self.conv else f"in={self.in_features}, out={self.out_features}"
        rows = ", ".join(f"int{k}={n}" for k, n in g.items() if n and k not in (0, 16))
        grouping = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"{kind}, rows {rows or 'none quantized'}, kept={g[16]}, pruned={g[0]}{grouping}, "
            f"A{self.config.activation.bits}, granularity={self.granularity}, weight_bytes={self.weight_bytes()} "
            f"({self.average_bits():.3f} bits + {self.overhead_bits_per_weight():.3f} overhead per weight)"
        )

    # ---- dequantization
    def _dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Write stored rows [start, stop) (storage order) dequantized into fp32 `out` [stop - start, K]."""
        group_start = 0
        for choice, n in self.storage_groups():
            lo, hi = max(start, group_start), min(stop, group_start + n)
            if lo < hi:
                dst = out[lo - start : hi - start]
                a, c = lo - group_start, hi - group_start
                if choice.bits == 16:
                    dst.copy_(self.kept[a:c])  # exact: every 16-bit float is an fp32
                else:
                    self._dequantize_group(choice, a, c, dst)
            group_start += n

    def _dequantize_group(self, choice: RowChoice, a: int, c: int, dst: torch.Tensor) -> None:
        """Rows [a, c) of quantized storage group `choice` dequantized into fp32 `dst` [c - a, K]."""
        k, sfx = self.in_features, group_suffix(choice)
        codes = unpack_codes(getattr(self, f"qweight_{sfx}")[a:c], choice.bits, k)
        zero, scale = getattr(self, f"zero_{sfx}")[a:c].float(), getattr(self, f"scale_{sfx}")[a:c].float()
        # (q - z) * s in fp32, the same two roundings as quantizer.dequantize_rows
        if choice.grouped:
            torch.sub(codes, expand_groups(zero, k, self.group_size), out=dst)
            dst.mul_(expand_groups(scale, k, self.group_size))
        else:
            torch.sub(codes, zero[:, None], out=dst)
            dst.mul_(scale[:, None])

    def _n_stored(self) -> int:
        return self.row_index.shape[0]

    def stored_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized stored rows [n_stored, K] in storage order (the compact weight), in `dtype`."""
        w = torch.empty(self._n_stored(), self.in_features, dtype=torch.float32, device=self.kept.device)
        self._dequantize_rows(0, w.shape[0], w)
        return w.to(dtype or self.source_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full reference weight [out, ...] (original shape; pruned rows zero), in `dtype` (default source).

        Equal (torch.equal) to `fake_quantize_weight(source_weight, row_bits, config.weight, group_size=...,
        grouped=...)` (format 2 and 3).
        """
        dtype = dtype or self.source_dtype
        full = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.kept.device)
        full.index_copy_(0, self.row_index.long(), self.stored_weight(dtype))
        return full.reshape(self.weight_shape)

    def clear_cache(self) -> None:
        self._cache = None

    def _cached(self, kind: str, dtype: torch.dtype, build) -> torch.Tensor:
        key = (kind, dtype, self.kept.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, build())
        return self._cache[1]

    def _apply(self, fn, recurse=True):
        # `model.half()` / `.float()` / `.to(dtype)` cast floating buffers. The format fixes the scales to fp32 and
        # the kept rows to 16 bits, so weight_bytes and the artifact do not change with the compute dtype: a cast to
        # a wider dtype leaves 16-bit kept rows as they are (exact), a cast to another 16-bit dtype converts them
        # like any module's weights. The source dtype (weight, bias) follows the cast.
        kept_before = self.kept.dtype
        # the scales before the cast: a cast through fp16 / bf16 would round fp32 scales (and back-casting cannot
        # undo it), so after it they are taken from here, moved only to the new device (the uint8 zero points are
        # never touched by a floating-point cast)
        fixed = {
            name: self._buffers[name]
            for name in (f"scale_{group_suffix(c)}" for c in QUANTIZED_STORAGE)
            if self._buffers.get(name) is not None
        }
        super()._apply(fn, recurse)
        new_source = fn(torch.empty(0, dtype=self._source_dtype)).dtype
        if new_source.is_floating_point:
            self._source_dtype = new_source
        kept = self._buffers["kept"]
        if kept_before.itemsize == 2 and kept.dtype.itemsize > 2:
            self._buffers["kept"] = kept.to(kept_before)
        for name, before in fixed.items():
            t = self._buffers[name]
            if t.dtype != before.dtype:  # a meta tensor has no values to keep: only its dtype is restored
                self._buffers[name] = t.to(before.dtype) if before.is_meta or t.is_meta else before.to(t.device)
        self._cache = None
        return self

    def repack_kept(self) -> bool:
        """Round kept rows stored wider than `quantizer.kept_dtype(source_dtype)` (format-1 layers of fp32 models)
        to it, as format 2 stores them; changes those rows by that rounding. Returns whether anything changed."""
        want = _kept_dtype(self.source_dtype)
        if self.kept.dtype.itemsize <= want.itemsize:
            return False
        self._buffers["kept"] = self.kept.to(want)
        self._cache = None
        return True

    # ---- forward
    # Kernel override of this layer: None (then $QVLA_KERNELS, else "auto"), "auto", "reference", "cpu" or "triton";
    # the rules are in `qvla_quant.kernels` (`select`). A class attribute, so layers built or loaded before the
    # kernels existed have it too.
    kernels: str | None = None

    def _kernel_kind(self, x2: torch.Tensor) -> str | None:
        """The kernel family for this call ("cpu", "triton") or None for the reference path below."""
        return kernels.select(self, x2)

    def _kernel_layout(self, kind: str, device: torch.device):
        """The resident repacked layout of `kind` for `device`, built at the first call and rebuilt whenever the
        stored buffers changed (`kernels.LayoutKey`). A plain attribute, not a buffer: never saved, never cast by
        `.half()` / `.to(dtype)`, not listed by `named_buffers()`."""
        state = self.__dict__.get("_kernel_state")
        if state is None or not state.key.matches(self, kind, device):
            self.__dict__["_kernel_state"] = None  # drop the old layout before building the new one
            key = kernels.LayoutKey(self, kind, device)
            with torch.no_grad():
                if kind == "cpu":
                    state = kernels.cpu.build_layout(self, key)
                else:
                    state = kernels.triton_kernels.build_layout(self, key, device)
            self.__dict__["_kernel_state"] = state
        return state

    def clear_kernel_layout(self) -> None:
        """Free the resident kernel layout (rebuilt at the next fast forward)."""
        self.__dict__["_kernel_state"] = None

    def kernel_layout_bytes(self) -> int:
        """Bytes of the resident kernel layout on top of the packed buffers (0 until a fast forward built it)."""
        state = self.__dict__.get("_kernel_state")
        return 0 if state is None else state.nbytes()

    def _kernel_linear(self, kind: str, x2: torch.Tensor, *, stored_only: bool = False) -> torch.Tensor:
        """x2 [N, K] -> the full output [N, out] (or, `stored_only`, the stored rows [N, n_stored] in storage order,
        bias included) through the kernel family `kind`."""
        lay = self._kernel_layout(kind, x2.device)
        if kind == "cpu":
            return kernels.cpu.stored(self, lay, x2) if stored_only else kernels.cpu.linear(self, lay, x2)
        return kernels.triton_kernels.linear(lay, x2, stored_only=stored_only)

    def _linear_stored(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [N, K] -> outputs of the stored rows [N, n_stored] in storage order (their bias included)."""
        kind = self._kernel_kind(x2)
        if kind is not None:
            return self._kernel_linear(kind, x2, stored_only=True)
        bias = None if self.bias is None else self.bias[self.row_index.long()]
        if self.cache_dequantized:
            w = self._cached("stored", x2.dtype, lambda: self.stored_weight(x2.dtype))
            return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
        # accumulate, scale and add the bias in fp32 and round once at the end, whatever the input dtype (on CPU
        # fp32 matmuls are also the fast ones)
        xf = x2.float()
        y = torch.empty(x2.shape[0], self._n_stored(), dtype=torch.float32, device=x2.device)
        start = 0
        for c, n in self.storage_groups()[:-1]:
            if n:
                if c.grouped or len(BIT_PLANES[c.bits]) > 1:
                    self._block_group_matmul(c, xf, y[:, start : start + n])
                else:
                    self._packed_group_matmul(c.bits, xf, y[:, start : start + n])
            start += n
        n_kept = self.kept.shape[0]
        if n_kept:  # in blocks like the packed groups: the fp32 copy of a block stays in cache
            block = max(1, DEQUANT_BLOCK_BYTES // (4 * self.in_features))
            for r0 in range(0, n_kept, block):
                r1 = min(r0 + block, n_kept)
                y[:, start + r0 : start + r1] = xf @ self.kept[r0:r1].float().t()
        if bias is not None:
            y += bias.float()
        return y.to(x2.dtype)

    def _packed_group_matmul(self, bits: int, x2: torch.Tensor, y: torch.Tensor) -> None:
        """y[N, rows_b] = x2 @ dequantized(group b)^T in fp32 (x2, y fp32), dequantizing a block of rows at a time.

        Three choices keep the number of passes over the weight small (eager torch cannot fuse them):
        - the scale moves to the output, x @ ((q - z) s)^T = (x @ (q - z)^T) s: one multiply per output instead
          of one per weight (q - z is an exact small integer, so only the rounding order changes);
        - for int4/int2, q - z is formed in int8 (values in [-15, 15]) before the one conversion to float;
        - sub-byte codes are unpacked plane by plane (all low fields of a row, then the next field ...): the
          writes stay contiguous; x is permuted into the same plane order once per call instead.
        """
        q, scale, zero = (getattr(self, f"{p}_{bits}") for p in ("qweight", "scale", "zero"))
        n, nbytes = q.shape
        per_byte = 8 // bits
        k_pad = nbytes * per_byte
        xp = x2
        if per_byte > 1:  # column per_byte*j + i of x -> position i*nbytes + j; padding columns get x = 0
            xp = F.pad(x2, (0, k_pad - self.in_features)).reshape(-1, nbytes, per_byte).transpose(1, 2)
            xp = xp.reshape(-1, k_pad)
        block = max(1, min(n, DEQUANT_BLOCK_BYTES // (4 * k_pad)))
        w_buf = torch.empty(block, k_pad, dtype=torch.float32, device=q.device)
        if per_byte > 1:
            d_buf = torch.empty(block, k_pad, dtype=torch.int8, device=q.device)
            zero_int = zero.to(torch.int8)[:, None]
        else:
            zero_f = zero.float()[:, None]
        mask = (1 << bits) - 1
        scale_out = scale.float()
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            w = w_buf[: r1 - r0]
            if per_byte == 1:
                w.copy_(q[r0:r1])
                w.sub_(zero_f[r0:r1])
            else:
                d = d_buf[: r1 - r0]
                d_codes = d.view(torch.uint8)  # codes < 16 read the same as uint8 and int8: no cast needed
                for i in range(per_byte):
                    plane = d_codes[:, i * nbytes : (i + 1) * nbytes]
                    if i == 0:
                        torch.bitwise_and(q[r0:r1], mask, out=plane)
                    elif i == per_byte - 1:  # the top field: the shift alone isolates it
                        torch.bitwise_right_shift(q[r0:r1], bits * i, out=plane)
                    else:
                        torch.bitwise_and(q[r0:r1] >> (bits * i), mask, out=plane)
                d.sub_(zero_int[r0:r1])
                w.copy_(d)
            y[:, r0:r1] = (xp @ w.t()).mul_(scale_out[r0:r1])

    def _block_group_matmul(self, choice: RowChoice, x2: torch.Tensor, y: torch.Tensor) -> None:
        """y[N, rows] = x2 @ dequantized(group)^T in fp32 for multi-plane (3, 6 bits) and grouped rows, a block of
        rows at a time: per-row scales move to the output (x @ (q - z)^T) s, grouped rows are dequantized in full."""
        sfx, k = group_suffix(choice), self.in_features
        q, zero = getattr(self, f"qweight_{sfx}"), getattr(self, f"zero_{sfx}")
        n = q.shape[0]
        block = max(1, min(n, DEQUANT_BLOCK_BYTES // (4 * k)))
        w_buf = torch.empty(block, k, dtype=torch.float32, device=q.device)
        scale = getattr(self, f"scale_{sfx}").float()
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            w = w_buf[: r1 - r0]
            if choice.grouped:
                self._dequantize_group(choice, r0, r1, w)
                y[:, r0:r1] = x2 @ w.t()
            else:
                torch.sub(unpack_codes(q[r0:r1], choice.bits, k), zero[r0:r1].float()[:, None], out=w)
                y[:, r0:r1] = (x2 @ w.t()).mul_(scale[r0:r1])

    def _scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Stored-row outputs [N, n_stored] -> full [N, out]; pruned columns get their bias (or 0)."""
        n = y.shape[0]
        if self.bias is None:
            out = torch.zeros(n, self.out_features, dtype=y.dtype, device=y.device)
        else:
            out = self.bias.to(y.dtype).expand(n, self.out_features).clone()
        return out.index_copy_(1, self.row_index.long(), y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self._conv_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.config.activation.bits == 8:
            x2 = fake_quantize_activation(x2, 8)
        kind = self._kernel_kind(x2)
        if kind is not None:  # the kernels write the output rows in place: no separate scatter
            return self._kernel_linear(kind, x2).reshape(*lead, self.out_features)
        return self._scatter(self._linear_stored(x2)).reshape(*lead, self.out_features)

    def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.conv
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        padding = g.padding
        if g.padding_mode != "zeros":
            x = F.pad(x, g.reversed_padding, mode=g.padding_mode)
            padding = (0, 0)
        if self.config.activation.bits == 8:
            y = self._conv_a8(x, (0, 0) if padding == "valid" else padding)
        else:
            if self.cache_dequantized:
                w = self._cached("full", x.dtype, lambda: self.dequantized_weight(x.dtype))
            else:
                w = self.dequantized_weight(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.conv2d(x, w, bias, g.stride, padding, g.dilation, g.groups)
        return y.squeeze(0) if unbatched else y

    def _conv_a8(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        # a conv is a linear map over patches: quantize each patch (one unfold column) like a token
        g = self.conv
        batch, _, h, w = x.shape
        cols = F.unfold(x, g.kernel_size, dilation=g.dilation, padding=padding, stride=g.stride)  # [B, K, L]
        tokens = fake_quantize_activation(cols.transpose(1, 2).reshape(-1, self.in_features), 8)
        y = self._scatter(self._linear_stored(tokens))  # [B * L, out]
        h_out, w_out = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((h, w), padding, g.dilation, g.kernel_size, g.stride)
        )
        return y.reshape(batch, h_out * w_out, self.out_features).transpose(1, 2).reshape(batch, -1, h_out, w_out)


def row_bytes(
    fan_in: int,
    bits: int,
    source_dtype: torch.dtype,
    *,
    packed_version: int = PACKED_FORMAT_VERSION,
    grouped: bool = False,
    group_size: int | None = None,
) -> int:
    """Stored weight bytes of one row of `fan_in` weights at `bits` (see the module docstring's byte table).

    packed_version 3: code_bytes(K, b) + 9 for a per-row quantized row, code_bytes(K, b) + 5 * ceil(K / g) + 4 for
    a grouped one (`grouped`, `group_size` g), 2 * K + 4 at 16, 0 at 0 (`quantizer.row_storage_bytes`);
    packed_version 2: the same for its rows (2, 4, 8 per-row; 16; 0); packed_version 1 (the layout of older
    artifacts): ceil(K * b / 8) + 8, K * itemsize(source_dtype) + 4, 0.
    """
    if packed_version not in PACKED_READ_VERSIONS:
        raise ValueError(f"unknown packed format version {packed_version!r} (known: {PACKED_READ_VERSIONS})")
    if bits not in ROW_BITS:
        raise ValueError(f"bits must be one of {ROW_BITS}, got {bits}")
    if packed_version < 3 and (grouped or bits not in (0, *LAYOUT_2_GROUPS, 16)):
        raise ValueError(f"packed layout {packed_version} has no {'grouped ' if grouped else ''}{bits}-bit rows")
    RowChoice(bits, grouped).check()
    if bits == 0:
        return 0
    if bits == 16:
        kept = _kept_dtype(source_dtype) if packed_version >= 2 else source_dtype
        return fan_in * kept.itemsize + KEPT_ROW_OVERHEAD_BYTES
    if grouped:
        if group_size is None:
            raise ValueError("a grouped row needs a group_size")
        return code_bytes(fan_in, bits) + GROUP_OVERHEAD_BYTES * n_groups(fan_in, group_size) + ROW_INDEX_BYTES
    overhead = QUANTIZED_ROW_OVERHEAD_BYTES if packed_version >= 2 else 2 + 2 + 4
    return code_bytes(fan_in, bits) + overhead


def predicted_weight_bytes(
    layer_plan: LayerPlan, source_dtype: torch.dtype, *, packed_version: int = PACKED_FORMAT_VERSION
) -> int:
    """Weight bytes of the packed layer from its plan alone (the sum of `row_bytes` over its rows); equals
    `PackedLinear.weight_bytes()` exactly for a layer of that format version. Bias not included."""
    counts: dict[RowChoice, int] = {}
    for c in layer_plan.row_choices():
        counts[c] = counts.get(c, 0) + 1
    k = layer_plan.fan_in
    return sum(
        n * row_bytes(k, c.bits, source_dtype, packed_version=packed_version, grouped=c.grouped,
                      group_size=layer_plan.group_size)
        for c, n in counts.items()
    )  # fmt: skip


def plan_weight_bytes(
    plan: Plan, source_dtype: torch.dtype, role: str | None = None, *, packed_version: int = PACKED_FORMAT_VERSION
) -> int:
    """`predicted_weight_bytes` summed over the plan's layers (of one role, or all)."""
    return sum(
        predicted_weight_bytes(lp, source_dtype, packed_version=packed_version)
        for lp in plan.layers.values()
        if role is None or lp.role == role
    )


def stored_bits_per_weight(
    plan: Plan, source_dtype: torch.dtype, role: str | None = None, *, packed_version: int = PACKED_FORMAT_VERSION
) -> float:
    """Bits per weight as stored: 8 * plan_weight_bytes / weights (the plan's average bits + the overhead)."""
    n = sum(lp.n_weights for lp in plan.layers.values() if role is None or lp.role == role)
    return 8.0 * plan_weight_bytes(plan, source_dtype, role, packed_version=packed_version) / n if n else float("nan")


def overhead_bits_per_weight(
    plan: Plan, source_dtype: torch.dtype, role: str | None = None, *, packed_version: int = PACKED_FORMAT_VERSION
) -> float:
    """Stored bits per weight beyond `plan.average_bits(role)`: 72 bits per quantized row, grouped or not (+ the
    padding of its planes' last bytes), and 32 per kept row, over the weights (format 2 and 3; a grouped row's extra
    scales and zeros are in the plan's average). A budget of 4 at K = 128: 4.5625 bits stored, overhead 0.5625."""
    return stored_bits_per_weight(plan, source_dtype, role, packed_version=packed_version) - plan.average_bits(role)


def _codes_from_qparams(rows: torch.Tensor, bits: int, qparams, idx: torch.Tensor, group_size: int | None):
    """(codes, scale, zero) of `rows` (the layer's rows `idx`) from the layer's explicit qparams = (scale, zero):
    [out] per row, or [out, ceil(K / g)] per group of `group_size` g; codes clamp(round(w / s) + z, 0, 2^b - 1)."""
    scale, zero = (torch.as_tensor(t).detach().to(rows.device) for t in qparams)
    k, qmax = rows.shape[1], (1 << bits) - 1
    want = () if group_size is None else (-(-k // group_size),)
    if scale.shape[1:] != want or zero.shape != scale.shape or scale.shape[0] <= int(idx.max()):
        what = "[out] (per row)" if group_size is None else f"[out, {want[0]}] (per group of {group_size})"
        raise ValueError(
            f"qparams: scale {tuple(scale.shape)} / zero {tuple(zero.shape)}, expected {what} with "
            f"out > {int(idx.max())}"
        )
    scale, zero = scale[idx].float(), zero[idx].float()
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("qparams: scales must be finite and positive")
    if not bool(((zero == zero.round()) & (zero >= 0) & (zero <= qmax)).all()):
        raise ValueError(f"qparams: zero points must be integers in [0, {qmax}] at {bits} bits")
    s, z = (
        (scale, zero)
        if group_size is None
        else (scale.repeat_interleave(group_size, dim=1)[:, :k], zero.repeat_interleave(group_size, dim=1)[:, :k])
    )
    if group_size is None:
        s, z = s[:, None], z[:, None]
    codes = torch.clamp(torch.round(rows.float() / s) + z, 0, qmax).to(torch.uint8)
    return codes, scale.to(SCALE_DTYPE), zero.to(ZERO_DTYPE)
