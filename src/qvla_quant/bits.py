"""The bit-width vocabulary every part of qvla_quant shares (no torch here).

A row of a weight matrix is stored at one of ROW_BITS: 0 = pruned (its output is the bias), 16 = kept in the
source's 16-bit float dtype, 2/3/4/6/8 = integer codes with a per-row (or per-group, GROUPED_BITS only) scale and
zero point. The paper's set, BIT_CHOICES, is what calibration and allocation consider unless told otherwise.
"""

from __future__ import annotations

BIT_CHOICES: tuple[int, ...] = (0, 2, 4, 8, 16)  # the paper's set: default candidates of calibration / allocation
ROW_BITS: tuple[int, ...] = (0, 2, 3, 4, 6, 8, 16)  # every bit-width a row can be stored at
QUANTIZED_BITS: tuple[int, ...] = (2, 3, 4, 6, 8)
GROUPED_BITS: tuple[int, ...] = (2, 3, 4)  # bit-widths that may use group-wise scales
GROUP_SIZES: tuple[int, ...] = (64, 128, 256)  # allowed group sizes along K
KEEP_BITS = 16
PRUNE_BITS = 0
