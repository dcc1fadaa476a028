"""PackedLinear against the fake-quant reference: storage, bytes, forward (A16 and A8), linear and conv."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvla_quant.packed as packed_mod
from qvla_quant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from qvla_quant.packed import (
    PackedLinear,
    overhead_bits_per_weight,
    pack_codes,
    plan_weight_bytes,
    predicted_weight_bytes,
    stored_bits_per_weight,
    unpack_codes,
)
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import fake_quantize_activation, fake_quantize_weight
from qvla_quant.transforms import fake_quantize_model, quantize_model, set_dequantized_cache

A16 = QuantConfig()
A8 = QuantConfig(activation=ActivationQuantConfig(bits=8))
# max |packed - reference| <= REL_TOL * max |reference| (fp32; only the summation order differs)
REL_TOL = 1e-5


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    bound = rel * max(ref.abs().max().item(), 1e-6)
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def random_bits(out: int, seed: int, choices=(0, 2, 4, 8, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(choices)[torch.randint(0, len(choices), (out,), generator=g)]


# ---- bit packing


# the documented row stride: the sum over bit planes of ceil(K * p / 8)
ROW_STRIDE = {
    2: lambda k: -(-k // 4),
    3: lambda k: -(-k // 4) + -(-k // 8),
    4: lambda k: -(-k // 2),
    6: lambda k: -(-k // 2) + -(-k // 4),
    8: lambda k: k,
}


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13, 64, 67])
def test_pack_unpack_round_trip_exact(bits, k):
    codes = torch.randint(0, 1 << bits, (7, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, ROW_STRIDE[bits](k))
    if k % 8 == 0:
        assert packed.shape[1] == k * bits // 8  # exactly b bits per weight
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_bit_order_low_bits_first():
    # int4: column 0 in the low nibble; int2: column 4j+i in bits 2i..2i+1; padding codes are 0
    assert pack_codes(torch.tensor([[0x1, 0x2, 0xF]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b01]]
    # int3: the low 2 bits as int2 (ceil(K/4) bytes), then the high bit of every column, 8 per byte (ceil(K/8))
    three = torch.tensor([[5, 7, 2, 0, 4, 1, 6, 3, 7]], dtype=torch.uint8)
    low = [0b00101101, 0b11100100, 0b11]  # 5,7,2,0 -> 1,3,2,0; 4,1,6,3 -> 0,1,2,3; 7 -> 3
    high = [0b01010011, 0b1]  # 5,7,2,0,4,1,6,3 -> 1,1,0,0,1,0,1,0; 7 -> 1
    assert pack_codes(three, 3).tolist() == [low + high]
    # int6: the low nibbles as int4 (ceil(K/2) bytes), then the top 2 bits as int2 (ceil(K/4))
    six = torch.tensor([[0x3F, 0x12, 0x2A]], dtype=torch.uint8)
    assert pack_codes(six, 6).tolist() == [[0x2F, 0x0A, 0b10_01_11]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.zeros(2, 2, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(2, 2, dtype=torch.int32), 4)


# ---- linear forward == fake-quant reference


LINEAR_CASES = {
    "random-mix": (48, 40, None),
    "odd-k": (37, 29, None),
    "k1": (1, 9, None),
    "all-pruned": (16, 12, [0]),
    "all-kept": (16, 12, [16]),
    "all-int2-odd-k": (23, 10, [2]),
    "all-int4-odd-k": (23, 10, [4]),
    "no-kept": (33, 50, [0, 2, 4, 8]),
    "all-int3-odd-k": (23, 10, [3]),
    "all-int6-odd-k": (23, 10, [6]),
    "every-bit-width": (29, 31, [0, 2, 3, 4, 6, 8, 16]),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_matches_fake_quant_reference(case, bias):
    k, out, choices = LINEAR_CASES[case]
    torch.manual_seed(list(LINEAR_CASES).index(case))
    lin = nn.Linear(k, out, bias=bias)
    bits = random_bits(out, 1, choices or (0, 2, 4, 8, 16))
    layer = PackedLinear.from_float(lin, bits, A16)
    w_ref = fake_quantize_weight(lin.weight, bits, A16.weight)
    assert torch.equal(layer.dequantized_weight(), w_ref)
    assert torch.equal(layer.row_bits(), bits)
    x = torch.randn(3, 5, k)
    ref = F.linear(x, w_ref, lin.bias)
    assert_close_to(layer(x), ref)
    pruned = bits == 0
    expected_pruned = lin.bias[pruned] if bias else torch.zeros(int(pruned.sum()))
    assert torch.equal(layer(x)[..., pruned], expected_pruned.expand(3, 5, -1))  # a pruned row outputs its bias


def test_linear_many_dequant_blocks(monkeypatch):
    # force blocks of a few rows, so block boundaries inside every group are exercised
    monkeypatch.setattr(packed_mod, "DEQUANT_BLOCK_BYTES", 4 * 64 * 3)
    lin = nn.Linear(61, 70)
    bits = random_bits(70, 2, (0, 2, 3, 4, 6, 8, 16))
    layer = PackedLinear.from_float(lin, bits, A16)
    x = torch.randn(4, 61)
    assert_close_to(layer(x), F.linear(x, fake_quantize_weight(lin.weight, bits, A16.weight), lin.bias))


def test_cached_dequantized_weight_matches_and_is_invalidated():
    lin = nn.Linear(40, 24)
    bits = random_bits(24, 3)
    layer = PackedLinear.from_float(lin, bits, A16)
    x = torch.randn(6, 40)
    plain = layer(x)
    assert layer.cache_bytes() == 0
    set_dequantized_cache(layer, True)
    cached = layer(x)
    assert layer.cache_bytes() == int((bits != 0).sum()) * 40 * 4
    assert_close_to(cached, F.linear(x, fake_quantize_weight(lin.weight, bits, A16.weight), lin.bias))
    assert_close_to(cached, plain)
    layer.double()  # a dtype change drops the cache; scale/zero and the 16-bit kept rows keep their storage
    assert layer.cache_bytes() == 0 and layer.scale_4.dtype == torch.float32 and layer.zero_4.dtype == torch.uint8
    assert layer.kept.dtype == torch.bfloat16 and layer.source_dtype == layer.bias.dtype == torch.float64
    assert layer.weight.dtype == torch.float64 and layer(x.double()).dtype == torch.float64
    layer.half()  # to another 16-bit dtype: the kept rows are converted like any module's weights
    assert layer.kept.dtype == layer.source_dtype == torch.float16 and layer.scale_4.dtype == torch.float32


def test_dtype_casts_keep_the_scales_exact():
    # a cast through fp16 / bf16 must not round the fp32 scales: casting back cannot undo that rounding
    lin = nn.Linear(40, 24)
    lin.weight.data[:12] *= 1e-3  # small-range rows: their scales are far from fp16's grid
    bits = random_bits(24, 7, (0, 2, 4, 8, 16))
    layer = PackedLinear.from_float(lin, bits, A16)
    scales = {n: b.clone() for n, b in layer.named_buffers() if n.startswith("scale_") and b is not None}
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16, torch.nn.Module.float):
        cast(layer)
        for n, b in scales.items():
            assert torch.equal(getattr(layer, n), b), (cast.__name__, n)


def test_a8_linear_matches_reference():
    lin = nn.Linear(32, 20)
    bits = random_bits(20, 4)
    layer = PackedLinear.from_float(lin, bits, A8)
    x = torch.randn(2, 7, 32) * 3 + 1
    ref = F.linear(fake_quantize_activation(x, 8), fake_quantize_weight(lin.weight, bits, A8.weight), lin.bias)
    assert_close_to(layer(x), ref)
    assert (layer(x) - F.linear(x, fake_quantize_weight(lin.weight, bits), lin.bias)).abs().max() > 0  # A8 acts


def test_bf16_source_forward():
    lin = nn.Linear(24, 16).to(torch.bfloat16)
    bits = random_bits(16, 5)
    layer = PackedLinear.from_float(lin, bits, A16)
    assert layer.kept.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    w_ref = fake_quantize_weight(lin.weight, bits)
    assert torch.equal(layer.dequantized_weight(), w_ref)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert_close_to(layer(x).float(), F.linear(x, w_ref, lin.bias).float(), rel=2e-2)


# ---- conv (patch embedding) == linear map over output filters


def test_conv_patch_embedding_matches_reference():
    conv = nn.Conv2d(3, 20, kernel_size=4, stride=4)
    bits = random_bits(20, 6)
    layer = PackedLinear.from_float(conv, bits, A16)
    assert layer.in_features == 3 * 4 * 4 and layer.kept.shape[1] == 48
    w_ref = fake_quantize_weight(conv.weight, bits, A16.weight)
    assert torch.equal(layer.dequantized_weight(), w_ref)
    x = torch.randn(2, 3, 16, 12)
    assert_close_to(layer(x), F.conv2d(x, w_ref, conv.bias, stride=4))
    assert layer(x[0]).shape == (20, 4, 3)  # unbatched input


def test_conv_overlapping_padded_and_reflect():
    for conv in (
        nn.Conv2d(4, 10, kernel_size=3, stride=1, padding=1, bias=False),
        nn.Conv2d(4, 10, kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2),
    ):
        bits = random_bits(10, 7)
        layer = PackedLinear.from_float(conv, bits, A16)
        ref = copy.deepcopy(conv)
        with torch.no_grad():
            ref.weight.copy_(fake_quantize_weight(conv.weight, bits))
        x = torch.randn(2, 4, 9, 9)
        assert_close_to(layer(x), ref(x))


def test_a8_conv_patch_embedding_matches_reference_model():
    model = nn.Sequential(nn.Conv2d(3, 12, kernel_size=4, stride=4, padding=1))
    plan = Plan({"0": LayerPlan("0", "vision", "conv", 12, 48, random_bits(12, 8).tolist())}, quant=A8)
    x = torch.randn(2, 3, 14, 15)  # padded size not a multiple of the stride: border pixels unused
    ref = fake_quantize_model(model, plan)(x)
    assert_close_to(quantize_model(model, plan, inplace=False)(x), ref)


def test_a8_overlapping_conv_matches_unfold_reference():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1)
    bits = random_bits(8, 9)
    layer = PackedLinear.from_float(conv, bits, A8)
    x = torch.randn(2, 3, 6, 5)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2)  # [B, L, 27]: a patch is a token
    w = fake_quantize_weight(conv.weight, bits).reshape(8, -1)
    ref = F.linear(fake_quantize_activation(cols, 8), w, conv.bias).transpose(1, 2).reshape(2, 8, 6, 5)
    assert_close_to(layer(x), ref)
    model = nn.Sequential(conv)
    plan = Plan({"0": LayerPlan("0", "vision", "conv", 8, 27, bits.tolist())}, quant=A8)
    with pytest.raises(NotImplementedError, match="patch-embedding"):
        fake_quantize_model(model, plan)


# ---- bytes


def plan_bytes(k: int, bits: torch.Tensor) -> int:
    """The documented formula, written out: row stride (ceil(K * b / 8) at 2, 4, 8; ceil(K/4) + ceil(K/8) at 3,
    ceil(K/2) + ceil(K/4) at 6) + 4 (fp32 scale) + 1 (uint8 zero) + 4 (int32 row index) per quantized row, 2 * K + 4
    per kept row (16 bits), nothing per pruned row."""
    per_row = {0: 0, 16: 2 * k + 4, **{b: ROW_STRIDE[b](k) + 9 for b in ROW_STRIDE}}
    return sum(per_row[int(b)] for b in bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 7, 64, 65, 129])
def test_measured_bytes_equal_predicted(dtype, k):
    out = 31  # odd row count; every bit-width present
    lin = nn.Linear(k, out).to(dtype)
    bits = torch.cat([torch.tensor([0, 2, 3, 4, 6, 8, 16]), random_bits(out - 7, k, (0, 2, 3, 4, 6, 8, 16))])
    layer = PackedLinear.from_float(lin, bits, A16)
    lp = LayerPlan("x", "language", "linear", out, k, bits.tolist())
    # issue 11.1: the stored bytes are what the plan implies, for every source dtype (kept rows are 16-bit)
    assert layer.weight_bytes() == predicted_weight_bytes(lp, dtype) == plan_bytes(k, bits)
    plan = Plan({"x": lp})
    overhead = (8 * plan_bytes(k, bits) - k * int(bits.sum())) / (out * k)
    assert layer.overhead_bits_per_weight() == pytest.approx(overhead)
    assert overhead_bits_per_weight(plan, dtype) == pytest.approx(overhead)
    assert stored_bits_per_weight(plan, dtype) == pytest.approx(plan.average_bits() + overhead)
    assert layer.bias_bytes() == out * lin.bias.element_size()
    # layout: dtypes and shapes as documented
    for b in (8, 6, 4, 3, 2):
        n = int((bits == b).sum())
        assert getattr(layer, f"qweight_{b}").shape == (n, ROW_STRIDE[b](k))
        assert getattr(layer, f"qweight_{b}").dtype == torch.uint8
        assert getattr(layer, f"scale_{b}").dtype == torch.float32 and getattr(layer, f"zero_{b}").dtype == torch.uint8
    kept = torch.bfloat16 if dtype == torch.float32 else dtype
    assert layer.kept.dtype == kept and layer.kept.shape == (int((bits == 16).sum()), k)
    assert layer.row_index.dtype == torch.int32 and layer.bias.dtype == dtype == layer.source_dtype
    assert layer.weight.dtype == dtype
    assert set(layer.state_dict()) == {
        *(f"{p}_{b}" for p in ("qweight", "scale", "zero") for b in (8, 6, 4, 3, 2, "4g", "3g", "2g")),
        "kept",
        "row_index",
        "bias",
    }


@pytest.mark.parametrize("bits", [0, 2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_of_a_uniform_layer(bits, dtype):
    # 13 rows of K = 37 at one bit-width, in a whole quantized model: weight_bytes == the formula
    model = nn.Sequential(nn.Linear(37, 13)).to(dtype)
    plan = Plan({"0": LayerPlan("0", "action", "linear", 13, 37, [bits] * 13)})
    qmodel = quantize_model(model, plan, inplace=False)
    assert qmodel[0].weight_bytes() == plan_weight_bytes(plan, dtype) == plan_bytes(37, torch.full((13,), bits))
    assert qmodel(torch.randn(2, 37, dtype=dtype)).dtype == dtype


def test_bytes_of_a_4bit_layer():
    # 4 bits at K = 128: K/2 code bytes + 4 + 1 (scale, zero) + 4 (row index) per row = 4.5625 bits per weight
    layer = PackedLinear.from_float(nn.Linear(128, 10), torch.full((10,), 4))
    assert layer.weight_bytes() == 10 * (64 + 9)
    assert layer.average_bits() == 4 and layer.overhead_bits_per_weight() == pytest.approx(0.5625)
    # a kept row of an fp32 layer is 16 bits per weight (+ its row index), not 32
    kept = PackedLinear.from_float(nn.Linear(128, 10), torch.full((10,), 16))
    assert kept.weight_bytes() == 10 * (256 + 4) and kept.overhead_bits_per_weight() == pytest.approx(0.25)


def test_fp32_layer_computes_in_fp32_from_bf16_kept_rows():
    torch.manual_seed(3)
    lin = nn.Linear(40, 12)
    bits = torch.tensor([16] * 6 + [8] * 6)
    layer = PackedLinear.from_float(lin, bits, A16)
    assert layer.kept.dtype == torch.bfloat16
    ref_w = lin.weight.detach().clone()
    ref_w[:6] = ref_w[:6].bfloat16().float()  # the stored 16-bit rows, used in fp32
    ref_w[6:] = fake_quantize_weight(lin.weight[6:], bits[6:], A16.weight)
    assert torch.equal(layer.dequantized_weight(), ref_w)
    assert torch.equal(fake_quantize_weight(lin.weight, bits, A16.weight), ref_w)  # the reference rounds the same
    x = torch.randn(5, 40)
    out = layer(x)
    assert out.dtype == torch.float32
    assert_close_to(out, F.linear(x, ref_w, lin.bias))  # fp32 arithmetic: bf16 compute would miss by ~1e-3
    # an fp16 source keeps its rows bit-exact (bf16 would drop 3 mantissa bits), a bf16 one too
    for dtype in (torch.float16, torch.bfloat16):
        src = nn.Linear(40, 12).to(dtype)
        half = PackedLinear.from_float(src, bits, A16)
        assert half.kept.dtype == dtype and torch.equal(half.dequantized_weight()[:6], src.weight[:6])


def test_small_magnitude_layer_keeps_its_resolution():
    # issue 11.6 through the packed layer: weights of std 5e-4 at 8 bits (fp16 scales clamped at 6.1e-5 used 38 of
    # 256 codes and made the error 4x larger)
    torch.manual_seed(4)
    lin = nn.Linear(512, 8)
    with torch.no_grad():
        lin.weight.mul_(5e-4 / lin.weight.std())
    cfg = QuantConfig(weight=WeightQuantConfig(clip_search=False))
    layer = PackedLinear.from_float(lin, torch.full((8,), 8), cfg)
    step = (lin.weight.amax(1) - lin.weight.amin(1)) / 255
    err = (layer.dequantized_weight() - lin.weight).abs().amax(1)
    assert (err <= 0.5 * step * (1 + 1e-4)).all()
    codes = unpack_codes(layer.qweight_8, 8, 512)
    assert min(len(codes[r].unique()) for r in range(8)) > 200


# ---- whole models


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.LayerNorm(24), nn.Linear(24, 8))


def tiny_plan(model: nn.Module, quant: QuantConfig = A16) -> Plan:
    layers = {}
    for i, name in enumerate(("0", "2", "4")):
        m = model.get_submodule(name)
        layers[name] = LayerPlan(
            name,
            "language",
            "linear",
            m.out_features,
            m.in_features,
            random_bits(m.out_features, 10 + i).tolist(),
        )
    return Plan(layers, quant=quant)


@pytest.mark.parametrize("quant", [A16, A8], ids=["A16", "A8"])
def test_quantize_model_matches_fake_quant_model(quant):
    model = tiny_model()
    plan = tiny_plan(model, quant)
    x = torch.randn(5, 16)
    before = model(x)
    ref = fake_quantize_model(model, plan)
    qmodel = quantize_model(model, plan, inplace=False)
    assert torch.equal(model(x), before)  # inplace=False leaves the source alone
    assert all(isinstance(qmodel.get_submodule(n), PackedLinear) for n in plan.layers)
    assert isinstance(model[0], nn.Linear)
    assert_close_to(qmodel(x), ref(x), rel=1e-4)
    assert "0.qweight_4" in qmodel.state_dict() and "0.weight" not in qmodel.state_dict()
    assert quantize_model(model, plan) is model and isinstance(model[0], PackedLinear)


def test_quantize_model_reports_every_bad_layer():
    model = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    plan = Plan(
        {
            "0": LayerPlan("0", "language", "linear", 5, 8, [4] * 5),  # wrong shape
            "1": LayerPlan("1", "language", "linear", 4, 4, [4] * 4),  # not a linear
            "7": LayerPlan("7", "language", "linear", 2, 4, [4] * 2),  # absent
        }
    )
    with pytest.raises(ValueError) as e:
        quantize_model(model, plan)
    msg = str(e.value)
    assert "'0'" in msg and "5 rows x 8" in msg and "(4 rows x 8)" in msg
    assert "'1' is a LayerNorm" in msg and "'7': no such module" in msg
    assert isinstance(model[0], nn.Linear)  # nothing was changed


def test_multihead_attention_out_proj_is_refused():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    plan = Plan({"attn.out_proj": LayerPlan("attn.out_proj", "vision", "linear", 8, 8, [4] * 8)})
    with pytest.raises(ValueError, match="out_proj of nn.MultiheadAttention 'attn'"):
        quantize_model(model, plan)
    with pytest.raises(ValueError, match="never calls the module"):
        fake_quantize_model(model, plan)


def test_bad_row_bits_and_modules():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        PackedLinear.from_float(lin, [4, 4, 4])
    with pytest.raises(ValueError, match="\\[5\\] are not in"):
        PackedLinear.from_float(lin, [4, 5, 4, 4])
    with pytest.raises(ValueError, match="one bit-width"):
        PackedLinear.from_float(lin, [4, 2, 16, 0], granularity="tensor")
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        PackedLinear.from_float(nn.Conv1d(2, 2, 1), [4, 4])
    with torch.device("meta"):
        meta = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="meta device"):
        PackedLinear.from_float(meta, [4] * 4)
