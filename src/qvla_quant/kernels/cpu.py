"""CPU fast path of `PackedLinear`: torch's low-bit CPU matmuls on a layout repacked once from the stored codes.

torch ships two weight-only CPU kernels (AVX512 / AVX2 code in aten, no extra dependency). Both dequantize in
registers, accumulate in fp32 and take bf16 activations (their fp32 variants are scalar loops, 15-40x slower):

    torch._weight_int8pack_mm(A bf16 [M, K], B int8 [N, K], s bf16 [N])     C[m, n] = bf16(s_n sum_k A_mk B_nk)
        constraints (read from the kernel): K % 16 == 0 (it loads 16 columns at a time with aligned loads: any other
        K reads past the rows or faults), rows 32-byte aligned (contiguous tensors with K % 16 == 0 are)
    aten._weight_int4pack_mm_for_cpu(A bf16 [M, K], P uint8, g, SZ bf16 [K / g, N, 2])
        C[m, n] = bf16(sum_k A_mk ((v_nk - 8) SZ[k // g, n, 0] + SZ[k // g, n, 1])), v_nk in [0, 15] the nibble
        P = aten._convert_weight_to_int4pack_for_cpu(v int32 [N, K], 1) (a tile order of its own);
        constraints: N % 16 == 0, K % g == 0, g in {32, 64, 128, 256}

Our rows are asymmetric: w = (q - z) s, q in [0, 2^b - 1], fp32 s and uint8 z per row (or per group of g columns).

int8 family: rows at 8 and 6 bits -> one `_weight_int8pack_mm`
    Per row pick an integer centre c with every q - c in [-128, 127]: c = clamp(z, q_max - 127, q_min + 128) (q_min,
    q_max: the row's smallest and largest code). 6-bit rows (q < 64) always get c = z; 8-bit rows get c = z when
    their codes allow it, else an offset z - c in [-128, 127] remains:
        x . (q - z) = x . (q - c) + (z - c) (-S),   S = sum_k x_k   (x: the bf16 activations the kernel reads)
    The offset term is folded INTO the kernel's fp32 sum as three extra columns: A gets -S split exactly into
    three bf16 numbers (hi, mid, lo: fp32 S has 24 significant bits, bf16 8), B gets z - c in each. Computing it
    outside instead (bf16 kernel output + fp32 offset) would cancel two large numbers after the kernel rounded one
    of them: with positive activations (after a GELU) and z far from c that loses the whole result.
    B = [q - c | z - c, z - c, z - c | 0 ...] int8 [N8, K8], K8 = ceil16(K + 3) (ceil16(K) when every offset is 0);
    the kernel's scale vector is all ones (exact in bf16) and the fp32 s multiplies the output afterwards.
    6-bit codes are widened to bytes: the resident copy costs 8 bits per weight for 6-bit rows.

int4 family: rows at 4, 3, 2 bits, per-row and grouped -> one `_weight_int4pack_mm_for_cpu`
    Every code fits a nibble (3- and 2-bit codes are widened: 4 resident bits per weight instead of 3 or 2).
    The kernel computes (v - 8) a + b per (group, row); we choose
        per-row rows:  a = 1, b = 8 - z                    exact in bf16: the kernel forms the exact integer v - z,
                                                           the fp32 s multiplies the output afterwards
        grouped rows:  codes shifted per group, v' = v + d_j, so that the kernel's "- 8" cancels the zero point:
                       a = bf16(s_j), b = bf16(e_j a), e_j = 8 - d_j - z_j (0 whenever v + 8 - z_j fits a nibble,
                       always for 2- and 3-bit groups): the group scale is rounded to bf16 (relative 2^-8), the one
                       lossy step of this path (`_grouped_nibbles`)
    g_k: the layer's group size when it has grouped rows (the kernel's groups are then exactly the layer's, K padded
    to K4 = ceil(K / g) g with zero activations), else the largest of 256, 128, 64, 32 dividing K4 = ceil32(K).
    Rows are padded to N4 = ceil16(rows) with zero codes. SZ costs 4 bytes per (kernel group, row): 32 / g_k bits
    per weight (0.125 at g_k = 256).

kept rows (16 bits): bf16 kept rows (those of fp32 and bf16 models) are used in place by a bf16 F.linear; fp16
    kept rows get a bf16 copy (2 bytes per weight, rounding them by 2^-8).

Epilogue, once per family: y = bf16 kernel output * fp32 column scale (s for per-row rows, 1 otherwise) + fp32 bias
(`torch.addcmul` into one fp32 [M, n_stored] buffer in storage order), then the columns go to their original rows
(`index_copy_` into an output pre-filled with the full bias, so pruned rows output their bias). A layer whose stored
rows are all its rows in ascending order (any uniform layer without pruning) skips that scatter.

Many tokens. These kernels are GEMV-like (register blocks of 4 tokens x 4 or 64 rows, time linear in the tokens);
beyond a few tokens oneDNN's bf16 GEMM is faster. Each family stays on its kernel up to a measured crossover
(`INT8_KERNEL_MAX_TOKENS` 12, `INT4_KERNEL_MAX_TOKENS` 32, `GROUPED_KERNEL_MAX_TOKENS` 64 for an int4 family with
grouped rows) and beyond dequantizes ~4 MiB blocks of rows to bf16 for bf16 F.linear (`_stored_gemm`): int8 rows
convert their resident centred codes, per-row 4/3/2-bit rows their stored codes minus z (both exact integers in
bf16, the scale applied to the output as above), grouped rows their fp32 dequantization rounded to bf16 once; kept
rows always go to F.linear directly. Same error bound (grouped rows: u |w| instead of the kernel's bf16 scales).

Resident memory of this path, on top of the packed buffers (`CpuLayout.nbytes`, `PackedLinear.kernel_layout_bytes`):
about 8 bits per weight for 8- and 6-bit rows, 4 (+ 32 / g_k) for 4-, 3- and 2-bit rows, nothing for bf16 kept rows,
plus 8 bytes per stored row (fp32 column scale and bias), 4 per output row (the full fp32 bias) and, for layers
that need the scatter, 8 per stored row (int64 index). At K = 8192 a W4 layer holds 4.01 stored + 4.14 resident
bits per weight (51 % of its bf16 copy), a W8 layer 8.01 + 8.03 (the size of its bf16 copy): the price of using
torch's kernels, whose layouts differ from the artifact's. Built lazily at the first fast forward, freed by
`PackedLinear.clear_kernel_layout`.

Numerics, with u = 2^-8: activations are rounded to bf16 once (|dx| <= u |x|), each family's output once (|dy| <=
u |y|); grouped rows add u sum |x| |w| through their bf16 scales. See `qvla_quant.kernels` for the bound the tests
check and `reference.error_bound` for its computation.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qvla_quant.codes import group_suffix, unpack_codes

# Tokens up to which each family stays on its GEMV-like kernel; beyond, blocked dequantization + bf16 GEMM. Measured
# crossovers on a 2-core AVX512-BF16 EPYC, one thread, 2048x8192: int8 ~12 tokens, int4 ~32 (its kernel is faster,
# its dequantization slower), int4 with grouped rows ~64 (group scales make the eager dequantization slow).
INT8_KERNEL_MAX_TOKENS = 12
INT4_KERNEL_MAX_TOKENS = 32
GROUPED_KERNEL_MAX_TOKENS = 64
GEMV_MAX_TOKENS = INT8_KERNEL_MAX_TOKENS  # up to here every family is on its kernel
# bytes of bf16 dequantized rows per block in the many-token path
DEQUANT_BLOCK_BYTES = 4 << 20
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts, largest first
_BF16 = torch.bfloat16


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------------------------
# availability


def has_ops() -> bool:
    """Whether this torch has the CPU low-bit matmul ops."""
    aten = torch.ops.aten
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and hasattr(aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")
    )


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (x86: avx512_bf16 or amx_bf16; Arm: the bf16 feature). Without it
    oneDNN's bf16 GEMM (kept rows, many tokens) emulates and can be 100x slower than fp32."""
    flags = cpu_flags()
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return "bf16" in flags


@functools.lru_cache(maxsize=1)
def self_check() -> bool:
    """Run both ops once on a tiny problem against a float reference: the path relies on private ops whose
    conventions (the int4 kernel's v - 8, its tile order) could change between torch versions."""
    if not has_ops():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        # small integers: the fp32 sums are exact, so each output is exactly the bf16 rounding of the true value
        x = torch.randint(-4, 5, (2, 64), generator=g).to(_BF16)
        q8 = torch.randint(-8, 8, (16, 64), generator=g, dtype=torch.int8)
        y8 = torch._weight_int8pack_mm(x, q8, torch.ones(16, dtype=_BF16))
        v = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int32)
        sz = torch.zeros(2, 16, 2, dtype=_BF16)
        sz[..., 0], sz[..., 1] = 1.0, -1.0
        y4 = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(v, 1), 32, sz
        )
        ok8 = torch.equal(y8, (x.float() @ q8.float().t()).to(_BF16))
        ok4 = torch.equal(y4, (x.float() @ (v.float() - 9.0).t()).to(_BF16))
        return bool(ok8 and ok4)
    except (RuntimeError, TypeError, ValueError):
        return False


def available() -> bool:
    """The "auto" rule for CPU inputs: ops present, self-check passed, native bf16 on this CPU."""
    return native_bf16() and self_check()


# ---------------------------------------------------------------------------------------------------------------
# the resident layout


@dataclass
class CpuLayout:
    """Repacked form of one PackedLinear for the CPU kernels (see the module docstring); stored-row order."""

    key: object  # qvla_quant.kernels.LayoutKey of the buffers it was built from
    k: int
    out_features: int
    n_stored: int
    # int8 family (rows 0 .. n8)
    n8: int
    k8: int
    w8: torch.Tensor | None  # int8 [n8, k8]
    ones8: torch.Tensor | None  # bf16 [n8], the kernel's scale vector
    offset8: bool  # whether the three -S columns are used
    # int4 family (rows n8 .. n8 + n4)
    n4: int
    k4: int
    g4: int
    w4: torch.Tensor | None  # uint8, the kernel's tile layout of [ceil16(n4), k4] nibbles
    grouped4: bool  # whether the int4 family has grouped rows
    sz4: torch.Tensor | None  # bf16 [k4 / g4, ceil16(n4), 2]
    # kept rows (the rest)
    kept: torch.Tensor | None  # bf16 [n16, K] (the layer's own buffer when it is bf16)
    kept_is_copy: bool
    col_scale: torch.Tensor  # fp32 [n_stored]
    bias: torch.Tensor | None  # fp32 [n_stored], bias of the stored rows
    bias_full: torch.Tensor | None  # fp32 [out], None without bias
    out_index: torch.Tensor | None  # long [n_stored]; None: stored rows are all rows, ascending

    def nbytes(self) -> int:
        """Resident bytes beyond the packed buffers."""
        ts = [self.w8, self.ones8, self.w4, self.sz4, self.col_scale, self.bias, self.bias_full, self.out_index]
        if self.kept_is_copy:
            ts.append(self.kept)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def build_layout(layer, key: object = None) -> CpuLayout:
    """Repack `layer` (a PackedLinear whose buffers are on the CPU) for the CPU kernels."""

    k = layer.in_features
    groups = layer.storage_groups()
    n8 = sum(n for c, n in groups if c.bits in (8, 6))
    n4 = sum(n for c, n in groups if c.bits in (4, 3, 2))
    n16 = sum(n for c, n in groups if c.bits == 16)
    n_stored = n8 + n4 + n16
    col_scale = torch.ones(n_stored, dtype=torch.float32)

    def rows(c):
        sfx = group_suffix(c)
        return (getattr(layer, f"{p}_{sfx}") for p in ("qweight", "scale", "zero"))

    # ---- int8 family
    w8 = ones8 = None
    k8, offset8 = _ceil(k, 16), False
    if n8:
        blocks, offsets, r = [], [], 0
        for c, n in groups:
            if c.bits not in (8, 6) or not n:
                continue
            packed, scale, zero = rows(c)
            q = unpack_codes(packed, c.bits, k).to(torch.int16)
            z = zero.to(torch.int16)
            centre = torch.maximum(torch.minimum(z, q.amin(1) + 128), q.amax(1) - 127)
            blocks.append((q - centre[:, None]).to(torch.int8))
            offsets.append((z - centre).to(torch.int8))
            col_scale[r : r + n] = scale.float()
            r += n
        offset = torch.cat(offsets)
        offset8 = bool(offset.any())
        k8 = _ceil(k + 3, 16) if offset8 else _ceil(k, 16)
        w8 = torch.zeros(n8, k8, dtype=torch.int8)
        w8[:, :k] = torch.cat(blocks)
        if offset8:
            w8[:, k : k + 3] = offset[:, None]
        ones8 = torch.ones(n8, dtype=_BF16)

    # ---- int4 family
    w4 = sz4 = None
    grouped = [c for c, n in groups if c.grouped and n]
    if grouped:
        g4 = layer.group_size
        k4 = _ceil(k, g4)
    else:
        k4 = _ceil(k, 32)
        g4 = next(g for g in INT4_KERNEL_GROUPS if k4 % g == 0)
    if n4:
        n4p = _ceil(n4, 16)
        v = torch.zeros(n4p, k4, dtype=torch.int32)
        sz = torch.zeros(k4 // g4, n4p, 2, dtype=torch.float32)
        sz[..., 0] = 1.0
        r = 0
        for c, n in groups:
            if c.bits not in (4, 3, 2) or not n:
                continue
            packed, scale, zero = rows(c)
            codes = unpack_codes(packed, c.bits, k).to(torch.int32)
            if c.grouped:
                v[r : r + n], sz[:, r : r + n] = _grouped_nibbles(codes, scale, zero, g4, k4)
            else:
                v[r : r + n, :k] = codes
                sz[:, r : r + n, 1] = (8.0 - zero.float())[None, :]
                col_scale[n8 + r : n8 + r + n] = scale.float()
            r += n
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(v, 1)
        sz4 = sz.to(_BF16)  # scales and zeros rounded once, here (exact for per-row rows)

    # ---- kept rows
    kept, kept_is_copy = None, False
    if n16:
        kept = layer.kept
        if kept.dtype != _BF16:
            kept, kept_is_copy = kept.to(_BF16), True

    index = layer.row_index.long()
    identity = n_stored == layer.out_features and bool(torch.equal(index, torch.arange(n_stored)))
    bias_full = None if layer.bias is None else layer.bias.detach().float().clone()
    return CpuLayout(
        key=key, k=k, out_features=layer.out_features, n_stored=n_stored,
        n8=n8, k8=k8, w8=w8, ones8=ones8, offset8=offset8,
        n4=n4, k4=k4, g4=g4, w4=w4, sz4=sz4, grouped4=bool(grouped),
        kept=kept, kept_is_copy=kept_is_copy,
        col_scale=col_scale,
        bias=None if bias_full is None else bias_full[index].contiguous(),
        bias_full=bias_full,
        out_index=None if identity else index,
    )  # fmt: skip


def _grouped_nibbles(codes, scale, zero, g: int, k4: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped rows for the int4 kernel: nibbles int32 [n, k4] and (a, b) fp32 [G, n, 2] (rounded to bf16 later).

    Group j's codes are shifted by an integer d_j chosen so that the kernel's fixed "- 8" cancels the zero point:
    v' = v + d_j, (v' - 8) a + b = (v - z_j) s_j with a = s_j and b = e_j a, e_j = 8 - d_j - z_j. d_j = 8 - z_j
    (e_j = 0: then only a is rounded, |dw| <= 2^-8 |w|) whenever every v + d_j stays in [0, 15], always true for 2-
    and 3-bit codes; otherwise d_j is the allowed shift closest to it. b is formed from the bf16-rounded a, so the
    weight error is (v - z_j)(a - s_j) + rounding(b): at most 2^-8 (|w| + |e_j| s_j) <= 2^-8 (|w| + |8 - z_j| s_j).
    """
    n, k = codes.shape
    groups = k4 // g
    pad = k4 - k
    vmin = F.pad(codes, (0, pad), value=15).reshape(n, groups, g).amin(2)  # padding columns do not constrain d
    vmax = F.pad(codes, (0, pad), value=0).reshape(n, groups, g).amax(2)
    z = zero.to(torch.int32)
    d = torch.minimum(torch.maximum(8 - z, -vmin), 15 - vmax)
    shifted = (F.pad(codes, (0, pad)).reshape(n, groups, g) + d[..., None]).clamp_(0, 15)  # clamps padding only
    a = scale.float().to(_BF16).float()
    b = (8 - d - z).float() * a
    return shifted.reshape(n, k4), torch.stack((a, b), dim=-1).transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# forward


def _epilogue(y: torch.Tensor, part: torch.Tensor, lay: CpuLayout, a: int, b: int) -> None:
    """y[:, a:b] = part * col_scale[a:b] (+ bias[a:b]), in fp32, in one pass."""
    scale = lay.col_scale[a:b]
    if lay.bias is None:
        torch.mul(part, scale, out=y[:, a:b])
    else:
        torch.addcmul(lay.bias[a:b], part, scale, out=y[:, a:b])


def _int8_input(xb: torch.Tensor, lay: CpuLayout) -> torch.Tensor:
    """bf16 [M, K] -> the int8 kernel's A [M, K8]: x, then -S as three bf16 parts (hi + mid + lo = -S exactly: fp32
    has 24 significant bits, bf16 8), then zeros. Few, whole-tensor ops: at one token each op's dispatch (~2-4 us)
    is a visible share of a 1024x1024 layer's ~60 us."""
    m, k = xb.shape
    if lay.k8 == k and not lay.offset8:
        return xb
    xa = torch.empty(m, lay.k8, dtype=_BF16)
    xa[:, :k] = xb
    tail = k + 3 if lay.offset8 else k
    if lay.k8 > tail:
        xa[:, tail:].zero_()
    if lay.offset8:
        t = torch.sum(xb, 1, dtype=torch.float32).neg_()  # -S of exactly the values the kernel reads
        hi = t.to(_BF16)
        rest = t - hi  # exact in fp32 (promoted)
        mid = rest.to(_BF16)
        xa[:, k : k + 3] = torch.stack((hi, mid, (rest - mid).to(_BF16)), dim=1)
    return xa


def _int4_input(xb: torch.Tensor, lay: CpuLayout) -> torch.Tensor:
    k = xb.shape[1]
    return xb if lay.k4 == k else F.pad(xb, (0, lay.k4 - k))


def _stored_gemv(lay: CpuLayout, xb: torch.Tensor) -> torch.Tensor:
    """Few tokens: the low-bit kernels. xb bf16 [M, K] -> fp32 [M, n_stored] (scales and bias applied)."""
    m, k = xb.shape
    parts = []
    if lay.n8:
        parts.append((torch._weight_int8pack_mm(_int8_input(xb, lay), lay.w8, lay.ones8), 0, lay.n8))
    if lay.n4:
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(_int4_input(xb, lay), lay.w4, lay.g4, lay.sz4)
        parts.append((part if part.shape[1] == lay.n4 else part[:, : lay.n4], lay.n8, lay.n8 + lay.n4))
    if lay.kept is not None:
        parts.append((F.linear(xb, lay.kept), lay.n8 + lay.n4, lay.n_stored))
    if len(parts) == 1:  # one family (every uniform layer): its epilogue allocates the result
        part, a, b = parts[0]
        return part * lay.col_scale if lay.bias is None else torch.addcmul(lay.bias, part, lay.col_scale)
    y = torch.empty(m, lay.n_stored, dtype=torch.float32)
    for part, a, b in parts:
        _epilogue(y, part, lay, a, b)
    return y


def _plane_order_input(xb: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """x [M, K] -> [M, nbytes * f] with column f j + i (field i of byte j) at position i nbytes + j, zeros past K."""
    per_byte = 8 // bits
    m, k = xb.shape
    xp = F.pad(xb, (0, nbytes * per_byte - k)).reshape(m, nbytes, per_byte).transpose(1, 2)
    return xp.reshape(m, nbytes * per_byte)


def _plane_order_codes(q: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed single-plane rows [n, nbytes] -> bf16 (q - z) [n, nbytes * f] in field order (all fields 0 of the row,
    then all fields 1, ...): every write is contiguous and the subtraction runs on int8, the fast dtypes here
    (interleaving fields, or a uint8 - bf16 subtraction, measured 5-10x slower). Padding fields give -z, times the
    zero columns of `_plane_order_input`."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    n, nbytes = q.shape
    d = torch.empty(n, nbytes * per_byte, dtype=torch.uint8)
    for i in range(per_byte):
        plane = d[:, i * nbytes : (i + 1) * nbytes]
        if i == per_byte - 1:
            torch.bitwise_right_shift(q, bits * i, out=plane)
        else:
            torch.bitwise_and(q >> (bits * i) if i else q, mask, out=plane)
    d = d.view(torch.int8).sub_(zero.view(torch.int8)[:, None])  # codes and zeros < 16: the same bytes as int8
    return d.to(_BF16)


def _stored_gemm(layer, lay: CpuLayout, xb: torch.Tensor) -> torch.Tensor:
    """More tokens: per family, its kernel while that is cheaper (`*_KERNEL_MAX_TOKENS`), else blocks of rows
    dequantized to bf16 and multiplied by oneDNN's bf16 GEMM (fp32 accumulation, bf16 result). xb bf16 [M, K] ->
    fp32 [M, n_stored] (scales and bias applied).

    The cheapest exact source per family: int8 rows convert their resident centred codes (q - c, and the offset
    columns, exact in bf16) in one op against the same A as the kernel; per-row 4- and 2-bit rows their stored bytes
    field by field against a permuted x (`_plane_order_codes`), 3-bit rows their unpacked codes, both minus z
    (exact integers in bf16); grouped rows go through the reference's fp32 dequantization, rounded to bf16 once.
    The fp32 scale and bias are applied to the bf16 products, as in `_stored_gemv`."""

    m, k = xb.shape
    y = torch.empty(m, lay.n_stored, dtype=torch.float32)
    rows_per_block = max(16, DEQUANT_BLOCK_BYTES // (2 * max(k, lay.k8)))
    if lay.n8:
        xa = _int8_input(xb, lay)
        if m <= INT8_KERNEL_MAX_TOKENS:
            _epilogue(y, torch._weight_int8pack_mm(xa, lay.w8, lay.ones8), lay, 0, lay.n8)
        else:
            for r0 in range(0, lay.n8, rows_per_block):
                r1 = min(r0 + rows_per_block, lay.n8)
                _epilogue(y, F.linear(xa, lay.w8[r0:r1].to(_BF16)), lay, r0, r1)
    int4_on_kernel = lay.n4 and m <= (GROUPED_KERNEL_MAX_TOKENS if lay.grouped4 else INT4_KERNEL_MAX_TOKENS)
    if int4_on_kernel:
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(_int4_input(xb, lay), lay.w4, lay.g4, lay.sz4)
        _epilogue(y, part[:, : lay.n4], lay, lay.n8, lay.n8 + lay.n4)
    start = lay.n8
    for c, n in layer.storage_groups():
        if c.bits not in (4, 3, 2) or not n or int4_on_kernel:
            continue
        sfx = group_suffix(c)
        q, zero = getattr(layer, f"qweight_{sfx}"), getattr(layer, f"zero_{sfx}")
        plane_order = not c.grouped and c.bits in (4, 2)
        if plane_order:  # x permuted once into the byte layout's field order (see `_plane_order_codes`)
            xp = _plane_order_input(xb, c.bits, q.shape[1])
        for r0 in range(0, n, rows_per_block):
            r1 = min(r0 + rows_per_block, n)
            if plane_order:
                _epilogue(y, F.linear(xp, _plane_order_codes(q[r0:r1], zero[r0:r1], c.bits)), lay,
                          start + r0, start + r1)  # fmt: skip
                continue
            if c.grouped:
                w = torch.empty(r1 - r0, k, dtype=torch.float32)
                layer._dequantize_group(c, r0, r1, w)
                w = w.to(_BF16)
            else:  # 3 bits: two planes of different widths, unpacked column by column (slower, exact)
                w = unpack_codes(q[r0:r1], c.bits, k).to(_BF16).sub_(zero[r0:r1].to(_BF16)[:, None])
            _epilogue(y, F.linear(xb, w), lay, start + r0, start + r1)
        start += n
    if lay.kept is not None:
        _epilogue(y, F.linear(xb, lay.kept), lay, lay.n8 + lay.n4, lay.n_stored)
    return y


def _stored_rows(layer, lay: CpuLayout, x2: torch.Tensor) -> torch.Tensor:
    xb = x2.to(_BF16).contiguous()
    if x2.shape[0] <= GEMV_MAX_TOKENS:
        return _stored_gemv(lay, xb)
    return _stored_gemm(layer, lay, xb)


def stored(layer, lay: CpuLayout, x2: torch.Tensor) -> torch.Tensor:
    """Outputs of the stored rows [M, n_stored] in storage order, bias included, in x2's dtype
    (`PackedLinear._linear_stored`)."""
    return _stored_rows(layer, lay, x2).to(x2.dtype)


def linear(layer, lay: CpuLayout, x2: torch.Tensor) -> torch.Tensor:
    """The layer's output [M, out] for x2 [M, K] (fp32, bf16 or fp16), in x2's dtype; pruned rows = bias."""
    y = _stored_rows(layer, lay, x2)
    if lay.out_index is not None:
        m = x2.shape[0]
        if lay.bias_full is None:
            out = torch.zeros(m, lay.out_features, dtype=torch.float32)
        else:
            out = lay.bias_full.expand(m, lay.out_features).clone()
        y = out.index_copy_(1, lay.out_index, y)
    return y.to(x2.dtype)


__all__ = [
    "GEMV_MAX_TOKENS",
    "GROUPED_KERNEL_MAX_TOKENS",
    "INT4_KERNEL_MAX_TOKENS",
    "INT8_KERNEL_MAX_TOKENS",
    "CpuLayout",
    "available",
    "build_layout",
    "cpu_flags",
    "has_ops",
    "linear",
    "native_bf16",
    "self_check",
    "stored",
]
