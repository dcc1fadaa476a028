"""RTN baselines: uniform per-channel and layer-wise plans, as real packed models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvla_quant.baselines import layerwise_plan, linear_layers_spec, table3_plans, uniform_plan
from qvla_quant.layers import LayerDesc
from qvla_quant.packed import PackedLinear
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import fake_quantize_weight
from qvla_quant.transforms import fake_quantize_model, quantize_model

SPEC = [
    LayerDesc("vision.patch", "vision", "conv", 16, 48),
    LayerDesc("lm.q", "language", "linear", 64, 32),
    LayerDesc("lm.down", "language", "linear", 32, 128),
    LayerDesc("head", "action", "linear", 7, 33),
]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
def test_uniform_plans_hit_their_bit_average_exactly(bits):
    for granularity in ("row", "tensor"):
        plan = uniform_plan(SPEC, bits, granularity=granularity)
        assert plan.average_bits() == bits and plan.budget == bits and plan.pruned_fraction() == 0
        for role in plan.roles():
            assert plan.average_bits(role) == bits
        assert all(lp.granularity == granularity for lp in plan.layers.values())
        assert Plan.from_json(plan.to_json()).hash() == plan.hash()
    assert not uniform_plan(SPEC, 4).quant.weight.clip_search  # plain RTN


def test_uniform_plan_inputs():
    template = uniform_plan(SPEC, 8, activation_bits=8)
    template.model_fingerprint = "abc"
    from_template = uniform_plan(template, 2)
    assert from_template.model_fingerprint == "abc" and from_template.quant.activation.bits == 8
    assert from_template.method == "rtn-channel-w2a8"
    from_layers = layerwise_plan(list(template.layers.values()), 4)
    assert from_layers.method == "rtn-layer-w4a16" and list(from_layers.layers) == [s.name for s in SPEC]
    assert set(table3_plans(SPEC)) == {f"rtn-{g}-w{b}a16" for g in ("channel", "layer") for b in (8, 4, 2)}
    with pytest.raises(ValueError, match="bits must be one of"):
        uniform_plan(SPEC, 5)
    with pytest.raises(ValueError, match="expected layer descriptions"):
        uniform_plan([("a", "b")], 4)
    with pytest.raises(ValueError, match="repeated: \\['lm.q'\\]"):
        uniform_plan([*SPEC, SPEC[1]], 4)
    with pytest.raises(ValueError, match="granularity must be one of"):
        uniform_plan(SPEC, 4, granularity="group")


def test_tensor_granularity_needs_one_quantized_bit_width():
    LayerPlan("x", "language", "linear", 3, 4, [4, 16, 0], "tensor")  # kept/pruned rows may be mixed in
    with pytest.raises(ValueError, match="x: granularity 'tensor' .* got \\[2, 4\\]"):
        LayerPlan("x", "language", "linear", 3, 4, [4, 2, 0], "tensor")
    lp = LayerPlan.from_dict({"name": "x", "role": "r", "kind": "linear", "out_features": 1, "fan_in": 2, "bits": [4]})
    assert lp.granularity == "row"  # plans written before the field existed


def uneven_rows_weight() -> torch.Tensor:
    # rows whose ranges differ by three orders of magnitude: one scale for all of them wastes the small rows
    torch.manual_seed(0)
    return torch.randn(24, 40) * torch.logspace(-2, 1, 24)[:, None]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_layerwise_error_not_below_per_row_error(bits):
    w = uneven_rows_weight()
    row_plan = uniform_plan([LayerDesc("w", "language", "linear", 24, 40)], bits)
    tensor_plan = layerwise_plan([LayerDesc("w", "language", "linear", 24, 40)], bits)
    cfg = row_plan.quant.weight
    d_row = fake_quantize_weight(w, row_plan.layers["w"].bits, cfg) - w
    d_tensor = fake_quantize_weight(w, tensor_plan.layers["w"].bits, cfg, granularity="tensor") - w
    assert d_tensor.pow(2).sum() >= d_row.pow(2).sum()
    # and clearly so for the rows of small range, which one shared scale crushes
    relative = {k: (d.norm(dim=1) / w.norm(dim=1)).mean() for k, d in (("row", d_row), ("tensor", d_tensor))}
    assert relative["tensor"] > 2 * relative["row"]


def test_layerwise_is_a_real_packed_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        model[0].weight.copy_(uneven_rows_weight())
    spec = linear_layers_spec(model, role="language")
    assert spec == [LayerDesc("0", "language", "linear", 24, 40), LayerDesc("2", "language", "linear", 8, 24)]
    x = torch.randn(6, 40)
    errors = {}
    for granularity in ("row", "tensor"):
        plan = uniform_plan(spec, 4, granularity=granularity)
        qmodel = quantize_model(model, plan, inplace=False)
        layer = qmodel[0]
        assert isinstance(layer, PackedLinear) and layer.granularity == granularity
        if granularity == "tensor":
            assert layer.scale_4.unique().numel() == 1 and layer.zero_4.unique().numel() == 1
        else:
            assert layer.scale_4.unique().numel() > 1
        ref = fake_quantize_model(model, plan)(x)
        out = qmodel(x)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        errors[granularity] = (qmodel[0](x) - model[0](x)).pow(2).mean()
    assert errors["tensor"] >= errors["row"]


def test_linear_layers_spec_skips_attention_out_proj():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    model.fc = nn.Linear(8, 4)
    model.patch = nn.Conv2d(3, 8, 2, stride=2)
    assert linear_layers_spec(model) == [
        LayerDesc("fc", "other", "linear", 4, 8),
        LayerDesc("patch", "other", "conv", 8, 12),
    ]
