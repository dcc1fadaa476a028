"""The quantizer against references that do not use it: hand-computed codes, a nearest-code brute force over every
code of a row, and an independent numpy implementation of the clip search.

The packed-layer tests and the sensitivity brute force use `quantize_rows` itself as their oracle, so a wrong
rounding rule there (floor instead of round, say) would pass all of them; these tests pin the rule down.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvla_quant.config import WeightQuantConfig
from qvla_quant.quantizer import dequantize_rows, fake_quantize_rows, quantize_rows

NO_CLIP = WeightQuantConfig(clip_search=False)


def q(rows, bits, config=NO_CLIP, **kw):
    codes, scale, zero = quantize_rows(torch.tensor(rows, dtype=torch.float32), bits, config, **kw)
    return codes.tolist(), scale.float().tolist(), zero.float().tolist()


def test_hand_computed_4_bit_row():
    # range [-1.5, 6.0] at 4 bits: scale 7.5 / 15 = 0.5 (exact in fp32), zero point 1.5 / 0.5 = 3
    # w / s = [-3, -1.4, 0, 1.8, 4.4, 12, 10.2, 0.6] -> nearest [-3, -1, 0, 2, 4, 12, 10, 1] -> + 3
    codes, scale, zero = q([[-1.5, -0.7, 0.0, 0.9, 2.2, 6.0, 5.1, 0.3]], 4)
    assert scale == [0.5] and zero == [3.0]
    assert codes == [[0, 2, 3, 5, 7, 15, 13, 4]]
    w_hat = fake_quantize_rows(torch.tensor([[-1.5, -0.7, 0.0, 0.9, 2.2, 6.0, 5.1, 0.3]]), 4, NO_CLIP)
    assert w_hat.tolist() == [[-1.5, -0.5, 0.0, 1.0, 2.0, 6.0, 5.0, 0.5]]


def test_hand_computed_2_bit_row_with_an_inexact_scale_and_zero_point():
    # range [-1.0, 0.8] at 2 bits: scale 1.8 / 3 = 0.6, in fp32 (0.8f + 1.0f) / 3 = 0.5999999642372131; zero point
    # 1.0 / 0.59999996 = 1.666 -> 2; w / s = [-1.666, -0.667, 0, 0.4167, 1.333] -> [-2, -1, 0, 0, 1] -> + 2
    s = float(np.float32(np.float32(0.8) + np.float32(1.0)) / np.float32(3))
    assert s == 0.5999999642372131
    codes, scale, zero = q([[-1.0, -0.4, 0.0, 0.25, 0.8]], 2)
    assert scale == [s] and zero == [2.0]
    assert codes == [[0, 1, 2, 2, 3]]
    w_hat = dequantize_rows(*quantize_rows(torch.tensor([[-1.0, -0.4, 0.0, 0.25, 0.8]]), 2, NO_CLIP))
    assert w_hat[0].tolist() == pytest.approx([-2 * s, -s, 0.0, 0.0, s])


def test_hand_computed_8_bit_row_and_a_range_that_must_contain_zero():
    # all positive: the range is [0, 2.55], scale 0.01 (fp32 2.55f / 255 = 0.009999999776482582), zero point 0
    s = float(np.float32(np.float32(2.55) / np.float32(255)))
    codes, scale, zero = q([[0.5, 1.0, 2.55, 0.014, 0.006]], 8)
    assert scale == [s] and zero == [0.0]
    assert codes == [[round(0.5 / s), round(1.0 / s), 255, 1, 1]] == [[50, 100, 255, 1, 1]]
    # all negative: [-3, 0] at 2 bits, scale 1, zero 3; -2.6 -> -3 -> 0, -0.4 -> 0 -> 3, -1.2 -> -1 -> 2
    codes, scale, zero = q([[-3.0, -2.6, -0.4, -1.2]], 2)
    assert scale == [1.0] and zero == [3.0] and codes == [[0, 0, 3, 2]]


def test_hand_computed_3_bit_row():
    # range [-2, 5] at 3 bits: scale 7 / 7 = 1, zero point 2; w / s rounds to [-2, -1, 0, 1, 3, 5] -> + 2
    codes, scale, zero = q([[-2.0, -0.6, 0.2, 1.4, 2.6, 5.0]], 3)
    assert scale == [1.0] and zero == [2.0] and codes == [[0, 1, 2, 3, 5, 7]]


def test_hand_computed_grouped_row():
    # groups of 64 along a row of 70: [0, 64) spans [-1, 2] (scale 3/3 = 1, zero 1 at 2 bits), [64, 70) spans [0, 6]
    # (scale 2, zero 0): the second group keeps its own, coarser step; the first is not widened by it
    row = torch.zeros(1, 70)
    row[0, 0], row[0, 1], row[0, 2] = -1.0, 2.0, 0.6
    row[0, 64], row[0, 65] = 6.0, 3.1
    codes, scale, zero = quantize_rows(row, 2, NO_CLIP, group_size=64)
    assert scale.tolist() == [[1.0, 2.0]] and zero.tolist() == [[1, 0]]
    assert codes[0, :3].tolist() == [0, 3, 2] and codes[0, 64:66].tolist() == [3, 2]
    assert codes[0, 3:64].eq(1).all() and codes[0, 66:].eq(0).all()  # zeros are exact in both groups
    w_hat = dequantize_rows(codes, scale, zero, 64)
    assert w_hat[0, :3].tolist() == [-1.0, 2.0, 1.0] and w_hat[0, 64:66].tolist() == [6.0, 4.0]


def test_hand_computed_tensor_granularity():
    # one range over both rows: [-1, 2] at 2 bits, scale 1, zero 1
    codes, scale, zero = q([[-1.0, 0.6], [0.2, 2.0]], 2, granularity="tensor")
    assert scale == [1.0, 1.0] and zero == [1.0, 1.0]
    assert codes == [[0, 2], [1, 3]]


def random_rows(seed: int, rows: int = 24, k: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[:4] = w[:4].abs()  # some rows without negative weights
    w[4:8] = -w[4:8].abs()  # and some without positive ones
    w[8, 5] = 12.0  # an outlier, where clipping pays
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("clip", [False, True])
def test_every_code_is_the_nearest_code(bits, clip):
    """Brute force over all 2^bits codes: each weight's code reconstructs to the grid point nearest to it."""
    w = random_rows(bits)
    codes, scale, zero = quantize_rows(w, bits, WeightQuantConfig(clip_search=clip))
    s, z = scale.double()[:, None, None], zero.double()[:, None, None]
    grid = (torch.arange(1 << bits, dtype=torch.float64)[None, None, :] - z) * s  # [R, 1, 2^b]
    dist = (grid - w.double()[:, :, None]).abs()  # [R, K, 2^b]
    best = dist.min(dim=2).values
    mine = dist.gather(2, codes.long()[:, :, None]).squeeze(2)
    # equal up to float32 rounding of w / s (the quantizer divides in float32)
    assert torch.all(mine <= best + 1e-6 * s[:, :, 0]), (mine - best).max()
    z = zero.float()
    assert (z == z.round()).all() and ((0 <= z) & (z <= (1 << bits) - 1)).all()


def reference_quantize(w: np.ndarray, bits: int, clip_search: bool, grid: int = 20, min_ratio: float = 0.5):
    """An independent per-row implementation of the quantizer's definition (module docstring of quantizer.py)."""
    qmax = (1 << bits) - 1
    lo0, hi0 = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    best = None
    for ratio in np.linspace(1.0, min_ratio, grid) if clip_search and grid > 1 else [1.0]:
        lo, hi = lo0 * ratio, hi0 * ratio
        # the scale in fp32 arithmetic, as stored (no clamp: fp32 holds every row's step)
        s = float(np.float32(np.float32(hi) - np.float32(lo)) / np.float32(qmax))
        z = float(np.clip(np.round(-lo / s), 0, qmax))
        codes = np.clip(np.round(w.astype(np.float64) / s) + z, 0, qmax)
        err = float((((codes - z) * s - w) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, codes, s, z)
    return best


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_against_an_independent_implementation(bits):
    w = random_rows(10 + bits)
    # without the clip search: scale, zero point and codes all follow from the row's [min, max]
    codes, scale, zero = quantize_rows(w, bits, NO_CLIP)
    mismatched = 0
    for r in range(w.shape[0]):
        _, ref_codes, ref_s, ref_z = reference_quantize(w[r].numpy(), bits, clip_search=False)
        assert float(scale[r]) == ref_s and float(zero[r]) == ref_z
        mismatched += int((codes[r].numpy() != ref_codes).sum())
    assert mismatched <= 2  # float32 vs float64 division can flip a code sitting on a rounding tie, no more
    # with it: the reconstruction error of every row is the lowest over the same grid of clip factors
    cfg = WeightQuantConfig()
    w_hat = fake_quantize_rows(w, bits, cfg).double()
    err = ((w_hat - w.double()) ** 2).sum(dim=1)
    for r in range(w.shape[0]):
        ref_err, *_ = reference_quantize(w[r].numpy(), bits, True, cfg.clip_grid, cfg.clip_min_ratio)
        assert float(err[r]) == pytest.approx(ref_err, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("std", [1.0, 5e-4, 1e-6, 1e-12])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_small_rows_keep_their_resolution(bits, std):
    """Issue 11.6: an fp16 scale clamped at 6.1e-5 left an 8-bit row with std 5e-4 only 38 of its 256 codes.

    Whatever the row's magnitude, its step is (max - min) / (2^b - 1) and both ends of the range are codes."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 4096, generator=g) * std
    codes, scale, zero = quantize_rows(w, bits, NO_CLIP)
    qmax = (1 << bits) - 1
    step = (w.amax(1) - w.amin(1)) / qmax
    assert torch.allclose(scale.double(), step.double(), rtol=1e-6, atol=0)
    assert (codes.amin(1) == 0).all() and (codes.amax(1) == qmax).all()
    distinct = min(len(codes[r].unique()) for r in range(codes.shape[0]))
    assert distinct >= 0.8 * (qmax + 1), f"{distinct} of {qmax + 1} codes used"
    w_hat = dequantize_rows(codes, scale, zero)
    assert ((w_hat - w).abs().amax(1) <= 0.5 * scale * (1 + 1e-4) + 1e-6 * w.abs().amax(1)).all()
