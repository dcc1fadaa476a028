"""The bit-plane codec of the packed format: integer codes of a row <-> its bytes (the layout is specified in
`qvla_quant.packed`'s docstring, section "Codes and bit planes"). Shared by the packed layer and the kernels'
repacking, and free of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvla_quant.quantizer import BIT_PLANES, QUANTIZED_BITS, RowChoice, code_bytes


def packed_row_bytes(fan_in: int, bits: int) -> int:
    """Bytes of one packed row of `fan_in` codes at `bits` in QUANTIZED_BITS (`quantizer.code_bytes`: the sum of
    ceil(K * p / 8) over the bit planes p of `bits`)."""
    return code_bytes(fan_in, bits)


def group_suffix(choice: RowChoice) -> str:
    """Buffer-name suffix of a storage group: "4" (qweight_4 ...), "4g" (qweight_4g ...)."""
    return choice.label


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """One plane: uint8 fields [R, K] (values < 2^width) -> uint8 [R, ceil(K * width / 8)], low bits first."""
    if width == 8:
        return codes.contiguous()
    per_byte = 8 // width
    rows, k = codes.shape
    pad = -k % per_byte
    if pad:
        codes = F.pad(codes, (0, pad))  # padding codes are 0
    c = codes.reshape(rows, -1, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (width * i)
    return out


def _unpack_plane(packed: torch.Tensor, width: int, fan_in: int) -> torch.Tensor:
    if width == 8:
        return packed
    per_byte = 8 // width
    mask = (1 << width) - 1
    rows, nbytes = packed.shape
    out = torch.empty(rows, nbytes, per_byte, dtype=torch.uint8, device=packed.device)
    for i in range(per_byte):
        torch.bitwise_and(packed >> (width * i), mask, out=out[..., i])
    return out.reshape(rows, nbytes * per_byte)[:, :fan_in]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [R, K] (values < 2^bits) into uint8 [R, code_bytes(K, bits)]: bit plane after bit plane
    (`quantizer.BIT_PLANES`, low bits first), each plane low columns in low bits (see the module docstring)."""
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"pack_codes: bits must be one of {QUANTIZED_BITS}, got {bits}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_codes expects uint8 codes [R, K], got {codes.dtype} {tuple(codes.shape)}")
    planes = BIT_PLANES[bits]
    if len(planes) == 1:
        return _pack_plane(codes, bits)
    parts, shift = [], 0
    for width in planes:
        parts.append(_pack_plane((codes >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(parts, dim=1)


def unpack_codes(packed: torch.Tensor, bits: int, fan_in: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [R, code_bytes(K, bits)] -> uint8 codes [R, fan_in]."""
    planes = BIT_PLANES[bits]
    if len(planes) == 1:
        return _unpack_plane(packed, bits, fan_in)
    out, start, shift = None, 0, 0
    for width in planes:
        nbytes = (fan_in * width + 7) // 8
        field = _unpack_plane(packed[:, start : start + nbytes], width, fan_in)
        out = field.clone() if out is None else out.bitwise_or_(field << shift)
        start += nbytes
        shift += width
    return out
