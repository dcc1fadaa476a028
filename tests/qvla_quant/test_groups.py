"""Issue 11 beyond the paper: 3- and 6-bit rows, group-wise scales, their byte formulas and budget cost, plans that
carry them, artifacts (packed layout 3) and the old layouts that must keep loading with identical outputs; and the
choice between them: calibration that also measures grouped variants (CalibrationConfig.group_size, sensitivity
store format 3), allocation that picks per row between per-row and grouped within an exact budget, the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvla_quant.artifact import ARTIFACT_FILE, PLAN_FILE, artifact_summary, load_artifact, read_plan, save_artifact
from qvla_quant.baselines import grouped_plan, linear_layers_spec, rtn_plans, uniform_plan
from qvla_quant.config import AllocationConfig, CalibrationConfig, QuantConfig, WeightQuantConfig
from qvla_quant.layers import LayerDesc
from qvla_quant.packed import (
    PackedLinear,
    overhead_bits_per_weight,
    plan_weight_bytes,
    predicted_weight_bytes,
    row_bytes,
)
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import (
    GROUP_SIZES,
    ROW_BITS,
    RowChoice,
    fake_quantize_rows,
    fake_quantize_weight,
    quantize_rows,
    row_choices,
    row_plan_bits,
    row_quantization_error,
    row_storage_bytes,
)
from qvla_quant.transforms import fake_quantize_model, quantize_model

DATA = Path(__file__).resolve().parent / "data"
REL_TOL = 1e-5  # as test_packed: max |packed - reference| <= REL_TOL * max |reference| in fp32
STRIDE = {2: lambda k: -(-k // 4), 3: lambda k: -(-k // 4) + -(-k // 8), 4: lambda k: -(-k // 2),
          6: lambda k: -(-k // 2) + -(-k // 4), 8: lambda k: k}  # fmt: skip


def formula_row_bytes(k: int, bits: int, grouped: bool = False, g: int | None = None) -> int:
    """The documented layout-3 formula, written out: stride + 9 (per-row), stride + 5 ceil(K/g) + 4 (grouped),
    2K + 4 (kept), 0 (pruned)."""
    if bits == 0:
        return 0
    if bits == 16:
        return 2 * k + 4
    return STRIDE[bits](k) + (5 * -(-k // g) + 4 if grouped else 9)


def outlier_rows(seed: int, rows: int = 16, k: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.exp(0.5 * torch.randn(rows, 1, generator=g))
    spots = torch.randint(0, k, (rows, 3), generator=g)
    w.scatter_(1, spots, 15 * torch.randn(rows, 3, generator=g))  # a few outliers per row
    return w


def mixed_layer_plan(name: str, out: int, k: int, g: int, seed: int) -> LayerPlan:
    """Every storage kind at once: per-row 0/2/3/4/6/8/16 and grouped 2/3/4, in a random order."""
    kinds = [RowChoice(b) for b in ROW_BITS] + [RowChoice(b, True) for b in (2, 3, 4)]
    gen = torch.Generator().manual_seed(seed)
    pick = [kinds[i] for i in torch.randint(0, len(kinds), (out,), generator=gen).tolist()]
    pick[: len(kinds)] = kinds  # every kind present
    return LayerPlan(name, "language", "linear", out, k, [c.bits for c in pick], "row", g, [c.grouped for c in pick])


# ---- quantizer


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("clip", [False, True])
def test_each_group_is_quantized_like_a_row_of_its_own(bits, g, clip):
    w = outlier_rows(bits, rows=5, k=300)  # 300 = 4 x 64 + 44 = 2 x 128 + 44: the last group is shorter
    cfg = WeightQuantConfig(clip_search=clip)
    codes, scale, zero = quantize_rows(w, bits, cfg, group_size=g)
    n = -(-300 // g)
    assert codes.shape == (5, 300) and scale.shape == zero.shape == (5, n)
    assert scale.dtype == torch.float32 and zero.dtype == torch.uint8
    for j in range(n):
        part = w[:, j * g : (j + 1) * g]  # the clip search runs per group, on its own weights only
        c, s, z = quantize_rows(part, bits, cfg)
        assert torch.equal(codes[:, j * g : (j + 1) * g], c) and torch.equal(scale[:, j], s)
        assert torch.equal(zero[:, j], z)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [64, 128])
def test_grouped_error_not_above_per_row_error_with_outliers(bits, g):
    for clip in (False, True):
        cfg = WeightQuantConfig(clip_search=clip)
        w = outlier_rows(10 + bits)
        per_row = row_quantization_error(w, bits, cfg).pow(2).sum(1)
        grouped = row_quantization_error(w, bits, cfg, group_size=g).pow(2).sum(1)
        assert (grouped <= per_row * (1 + 1e-6)).all()
        assert grouped.sum() < 0.8 * per_row.sum()  # the outliers stay in their group: clearly better overall
    # and more bits are better, per row and grouped (3 sits between 2 and 4)
    w = outlier_rows(7)
    err = {b: row_quantization_error(w, b).pow(2).sum() for b in (2, 3, 4, 6, 8)}
    assert err[2] > err[3] > err[4] > err[6] > err[8]


def test_grouped_quantization_refusals():
    w = torch.randn(4, 70)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_rows(w, 4, group_size=32)
    with pytest.raises(ValueError, match="group-wise scales are for rows at"):
        quantize_rows(w, 8, group_size=64)
    with pytest.raises(ValueError, match="cannot be grouped"):
        quantize_rows(w, 4, group_size=64, granularity="tensor")
    with pytest.raises(ValueError, match="grouped rows need a group_size"):
        fake_quantize_weight(w, [4] * 4, grouped=[True] * 4)
    with pytest.raises(ValueError, match="grouped rows must be at"):
        fake_quantize_weight(w, [4, 8, 4, 4], group_size=64, grouped=[True, True, False, False])
    # a grouped layer whose K fits in one group is exactly the per-row quantization
    assert torch.equal(fake_quantize_rows(w, 3, group_size=128), fake_quantize_rows(w, 3))


def test_row_choices_and_their_costs():
    assert row_choices((0, 2, 4, 8, 16)) == tuple(RowChoice(b) for b in (0, 2, 4, 8, 16))
    labels = [c.label for c in row_choices(group_size=128)]
    assert labels == ["0", "2", "2g", "3", "3g", "4", "4g", "6", "8", "16"]
    assert RowChoice.parse("3g") == RowChoice(3, True) and RowChoice.parse(6) == RowChoice(6)
    with pytest.raises(ValueError, match="group-wise scales are for rows at"):
        RowChoice.parse("8g")
    for k in (1, 37, 64, 65, 300, 1024):
        for g in GROUP_SIZES:
            costs = [row_plan_bits(k, c.bits, grouped=c.grouped, group_size=g) for c in row_choices(group_size=g)]
            assert costs == sorted(costs)  # the listed order is the cost order, at every K (g >= 64)
            for b in (2, 3, 4):
                # the budget counts a grouped row's extra (scale, zero) pairs: 40 bits each
                assert row_plan_bits(k, b, grouped=True, group_size=g) == b * k + 40 * (-(-k // g) - 1)
                stored = row_storage_bytes(k, b, grouped=True, group_size=g)
                assert stored == formula_row_bytes(k, b, True, g)
                # stored = plan + the same 72 bits (+ padding) as a per-row row: overhead in one place
                padding = 8 * stored - row_plan_bits(k, b, grouped=True, group_size=g) - 72
                assert padding == 8 * row_storage_bytes(k, b) - b * k - 72 >= 0
        for b in ROW_BITS:
            assert row_storage_bytes(k, b) == formula_row_bytes(k, b) == row_bytes(k, b, torch.float32)


# ---- packed layers


@pytest.mark.parametrize("k,out,g", [(300, 37, 64), (129, 31, 128), (77, 19, 64), (64, 12, 128)])
def test_packed_layer_with_every_kind_matches_the_reference(k, out, g):
    torch.manual_seed(k)
    lin = nn.Linear(k, out)
    lp = mixed_layer_plan("x", out, k, g, seed=out)
    layer = PackedLinear.from_float(lin, lp.bits, QuantConfig(), group_size=g, grouped=lp.grouped)
    assert torch.equal(layer.row_bits(), lp.bits_tensor()) and torch.equal(layer.row_grouped(), lp.grouped_tensor())
    w_ref = fake_quantize_weight(lin.weight, lp.bits, group_size=g, grouped=lp.grouped)
    assert torch.equal(layer.dequantized_weight(), w_ref)
    x = torch.randn(3, 5, k)
    ref = F.linear(x, w_ref, lin.bias)
    out_ = layer(x)
    assert (out_ - ref).abs().max() <= REL_TOL * ref.abs().max()
    # bytes: measured == predicted from the plan == the documented formula
    expected = sum(formula_row_bytes(k, c.bits, c.grouped, g) for c in lp.row_choices())
    assert layer.weight_bytes() == predicted_weight_bytes(lp, torch.float32) == expected
    n = -(-k // g)
    for b in (4, 3, 2):
        rows = int(((lp.bits_tensor() == b) & lp.grouped_tensor()).sum())
        assert getattr(layer, f"qweight_{b}g").shape == (rows, STRIDE[b](k))
        assert getattr(layer, f"scale_{b}g").shape == getattr(layer, f"zero_{b}g").shape == (rows, n)
    # overhead = stored - plan average: 72 bits per quantized row (+ padding), 32 per kept row, grouped or not
    plan = Plan({"x": lp})
    assert layer.average_bits() == pytest.approx(plan.average_bits())
    assert overhead_bits_per_weight(plan, torch.float32) == pytest.approx(layer.overhead_bits_per_weight())
    quantized = sum(1 for b in lp.bits if b not in (0, 16))
    kept = lp.bits.count(16)
    padding = sum(8 * STRIDE[b](k) - b * k for b in lp.bits if b not in (0, 16))
    assert layer.overhead_bits_per_weight() == pytest.approx((72 * quantized + 32 * kept + padding) / (out * k))
    # cache and bf16 inputs go through the same groups
    layer.cache_dequantized = True
    assert (layer(x) - ref).abs().max() <= REL_TOL * ref.abs().max()


def test_grouped_conv_and_many_blocks(monkeypatch):
    import qvla_quant.packed as packed_mod

    monkeypatch.setattr(packed_mod, "DEQUANT_BLOCK_BYTES", 4 * 200 * 3)  # blocks of 3 rows
    conv = nn.Conv2d(8, 21, kernel_size=5, stride=2, padding=1)  # K = 200: groups of 64, 64, 64, 8
    lp = mixed_layer_plan("c", 21, 200, 64, seed=3)
    layer = PackedLinear.from_float(conv, lp.bits, group_size=64, grouped=lp.grouped)
    ref = nn.Conv2d(8, 21, kernel_size=5, stride=2, padding=1)
    with torch.no_grad():
        ref.weight.copy_(fake_quantize_weight(conv.weight, lp.bits, group_size=64, grouped=lp.grouped))
        ref.bias.copy_(conv.bias)
    x = torch.randn(2, 8, 11, 9)
    assert (layer(x) - ref(x)).abs().max() <= REL_TOL * ref(x).abs().max()
    lin = nn.Linear(200, 21)
    layer = PackedLinear.from_float(lin, lp.bits, group_size=64, grouped=lp.grouped)
    x = torch.randn(4, 200)
    w_ref = fake_quantize_weight(lin.weight, lp.bits, group_size=64, grouped=lp.grouped)
    assert (layer(x) - F.linear(x, w_ref, lin.bias)).abs().max() <= REL_TOL * F.linear(x, w_ref).abs().max()


def test_bad_grouped_layers_are_refused():
    lin = nn.Linear(70, 3)
    with pytest.raises(ValueError, match="grouped rows must be at"):
        PackedLinear.from_float(lin, [8, 4, 4], group_size=64, grouped=[True, False, False])
    with pytest.raises(ValueError, match="group_size must be one of"):
        PackedLinear.from_float(lin, [4, 4, 4], group_size=100, grouped=[True] * 3)
    with pytest.raises(ValueError, match="one scale per tensor"):
        PackedLinear.from_float(lin, [4, 4, 4], granularity="tensor", group_size=64, grouped=[True] * 3)
    # no grouped row: one form, whatever group size was given
    assert PackedLinear.from_float(lin, [4, 4, 4], group_size=64, grouped=[False] * 3).group_size is None


# ---- plans


def test_layer_plans_with_groups_validate_and_round_trip():
    lp = LayerPlan("x", "language", "linear", 4, 300, [2, 3, 4, 16], "row", 128, [True, True, False, False])
    assert lp.total_bits == (2 + 3 + 4 + 16) * 300 + 2 * 40 * (3 - 1)
    again = LayerPlan.from_dict(json.loads(json.dumps(lp.to_dict())))
    assert again == lp and again.to_dict()["grouped"] == [True, True, False, False]
    # all-False flags are the ungrouped layer: same dict (no new keys), same plan hash
    flat = LayerPlan("x", "language", "linear", 4, 300, [2, 3, 4, 16], "row", 128, [False] * 4)
    assert flat.group_size is None and flat.grouped is None
    assert set(flat.to_dict()) == {"name", "role", "kind", "out_features", "fan_in", "bits", "granularity"}
    for bad, match in (
        (dict(bits=[8, 4, 4, 4], group_size=64, grouped=[True, False, False, False]), "grouped rows must be at"),
        (dict(bits=[4] * 4, grouped=[True] * 4), "grouped rows need a group_size"),
        (dict(bits=[4] * 4, group_size=48, grouped=[True] * 4), "group_size must be one of"),
        (dict(bits=[4] * 4, group_size=64, grouped=[True] * 3), "3 grouped flags for 4 rows"),
        (dict(bits=[4] * 4, granularity="tensor", group_size=64, grouped=[True] * 4), "one scale per tensor"),
        (dict(bits=[4, 5, 4, 4]), r"bit-widths \[5\] not in"),
    ):
        with pytest.raises(ValueError, match=f"x: .*{match}"):
            LayerPlan("x", "language", "linear", 4, 300, **bad)


def test_plan_versions_old_plans_parse_and_keep_their_hash():
    old = {"name": "a", "role": "language", "kind": "linear", "out_features": 3, "fan_in": 8, "bits": [0, 4, 16]}
    plan_v1 = {"format_version": 1, "method": "qvla", "budget": 4.0, "model_fingerprint": "f",
               "quant": QuantConfig().to_dict(), "info": {}, "layers": [old]}  # fmt: skip
    plan = Plan.from_dict(plan_v1)
    assert plan.layers["a"].group_size is None and plan.layers["a"].granularity == "row"
    assert plan.to_dict()["format_version"] == 1  # the paper's vocabulary: still written as version 1
    h = plan.hash()
    assert Plan.from_json(plan.to_json()).hash() == h
    # 3-bit or grouped rows: version 2, and they round-trip
    for layer in (LayerPlan("a", "language", "linear", 3, 8, [3, 6, 4]),
                  LayerPlan("a", "language", "linear", 3, 8, [2, 4, 16], "row", 64, [True, False, False])):  # fmt: skip
        p = Plan({"a": layer})
        d = json.loads(p.to_json())
        assert d["format_version"] == 2 and d["average_bits"] == pytest.approx(p.average_bits())
        back = Plan.from_dict(d)
        assert back.hash() == p.hash() and back.layers["a"] == layer
    with pytest.raises(ValueError, match="format version 3 is not supported"):
        Plan.from_dict({**plan_v1, "format_version": 3})


def test_plan_average_and_stored_bits_count_the_groups():
    lp = LayerPlan("x", "language", "linear", 10, 1024, [2] * 10, "row", 128, [True] * 10)
    plan = Plan({"x": lp})
    assert plan.average_bits() == pytest.approx(2 + 40 * 7 / 1024)  # 8 groups: 7 extra (scale, zero) pairs
    assert plan.grouped_fraction() == 1.0 and plan.bit_histogram()[2] == 10 * 1024
    assert plan_weight_bytes(plan, torch.float32) == 10 * (256 + 5 * 8 + 4)
    assert overhead_bits_per_weight(plan, torch.float32) == pytest.approx(72 / 1024)  # as a per-row 2-bit row


# ---- baselines


def test_uniform_w3_and_grouped_rtn_plans():
    spec = [LayerDesc("a", "language", "linear", 8, 300), LayerDesc("b", "vision", "conv", 5, 48)]
    w3 = uniform_plan(spec, 3)
    assert w3.average_bits() == 3 == w3.budget and w3.method == "rtn-channel-w3a16"
    g2 = grouped_plan(spec, 2, 64)
    assert g2.method == "rtn-group64-w2a16" and all(lp.grouped == [True] * lp.out_features for lp in g2.layers.values())
    # a 48-wide layer has one group (no extra cost); the 300-wide one five
    expected = (8 * (2 * 300 + 40 * 4) + 5 * 2 * 48) / (8 * 300 + 5 * 48)
    assert g2.average_bits() == pytest.approx(expected) and g2.budget == pytest.approx(expected)
    assert Plan.from_json(g2.to_json()).hash() == g2.hash()
    assert set(rtn_plans(spec, (4, 3), (64, 128))) == {
        f"rtn-{kind}-w{b}a16" for b in (4, 3) for kind in ("channel", "layer", "group64", "group128")
    }
    with pytest.raises(ValueError, match="group-wise scales are for per-row granularity"):
        uniform_plan(spec, 8, group_size=64)


def test_grouped_rtn_beats_per_row_rtn_on_a_model_with_outliers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 48), nn.GELU(), nn.Linear(48, 16))
    with torch.no_grad():
        model[0].weight.copy_(outlier_rows(1, rows=48, k=256))
    spec = linear_layers_spec(model, role="language")
    x = torch.randn(32, 256)
    with torch.no_grad():
        y = model(x)
        err = {}
        for name, plan in (("w2", uniform_plan(spec, 2)), ("w2g64", grouped_plan(spec, 2, 64)),
                           ("w3", uniform_plan(spec, 3)), ("w4", uniform_plan(spec, 4))):  # fmt: skip
            q = quantize_model(model, plan, inplace=False)
            ref = fake_quantize_model(model, plan)(x)
            assert (q(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
            err[name] = float((q(x) - y).pow(2).mean())
    assert err["w2"] > err["w2g64"] and err["w2"] > err["w3"] > err["w4"]


# ---- artifacts


class Fixture(nn.Module):
    """The model of tests/qvla_quant/data/layout2 (torch.manual_seed(0); Fixture()), saved there by qvla_quant at
    packed layout 2 (commit 2199fb7) with every row kind of that layout ([0, 2, 4, 8, 16] repeated per layer), with
    its packed outputs on a fixed input and its dequantized weights in expected.safetensors."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 13, kernel_size=3, stride=3)
        self.fc1 = nn.Linear(13 * 4, 37)
        self.fc2 = nn.Linear(37, 11, bias=False)

    def forward(self, x):
        h = self.patch(x).flatten(1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def test_a_layout_2_artifact_loads_with_identical_outputs():
    from safetensors.torch import load_file

    directory = DATA / "layout2"
    manifest = json.loads((directory / ARTIFACT_FILE).read_text())
    assert manifest["format_version"] == 2 and manifest["packed_format_version"] == 2
    assert json.loads((directory / PLAN_FILE).read_text())["format_version"] == 1
    expected = load_file(str(directory / "expected.safetensors"))
    with torch.device("meta"):
        skeleton = Fixture()
    loaded = load_artifact(directory, skeleton)
    for name in ("patch", "fc1", "fc2"):
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.dequantized_weight(), expected[f"{name}.weight_hat"])
        assert layer.qweight_3.shape[0] == layer.qweight_6.shape[0] == layer.qweight_4g.shape[0] == 0
    assert torch.equal(loaded(expected["x"]), expected["y"])
    summary = artifact_summary(directory)
    assert summary["quantized_weight_bytes_planned"] == summary["quantized_weight_bytes_after"]
    assert (
        sum(m.weight_bytes() for m in loaded.modules() if isinstance(m, PackedLinear))
        == summary["quantized_weight_bytes_after"]
    )


def test_layout_3_artifact_round_trip_with_every_kind(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 37), nn.GELU(), nn.Linear(37, 20))
    layers = {"0": mixed_layer_plan("0", 37, 300, 64, seed=1), "2": mixed_layer_plan("2", 20, 37, 128, seed=2)}
    plan = Plan(layers, budget=5.0)
    save_artifact(tmp_path, model, plan)
    manifest = json.loads((tmp_path / ARTIFACT_FILE).read_text())
    assert manifest["packed_format_version"] == 3 and read_plan(tmp_path).to_dict()["format_version"] == 2
    summary = manifest["summary"]
    expected = sum(formula_row_bytes(lp.fan_in, c.bits, c.grouped, lp.group_size)
                   for lp in layers.values() for c in lp.row_choices())  # fmt: skip
    assert summary["quantized_weight_bytes_after"] == summary["quantized_weight_bytes_planned"] == expected
    assert summary["group_sizes"] == [64, 128] and summary["group_overhead_bytes"] == 5
    assert 0 < summary["grouped_fraction"] < 1
    loaded = load_artifact(tmp_path, nn.Sequential(nn.Linear(300, 37), nn.GELU(), nn.Linear(37, 20)))
    x = torch.randn(4, 300)
    q = quantize_model(model, plan, inplace=False)
    assert torch.equal(loaded(x), q(x))
    assert loaded[0].group_size == 64 and torch.equal(loaded[0].row_grouped(), layers["0"].grouped_tensor())
    # a plan whose grouping differs from the packed model's is refused at saving
    other = Plan({**layers, "0": LayerPlan("0", "language", "linear", 37, 300, layers["0"].bits)})
    with pytest.raises(ValueError, match="other grouped rows"):
        save_artifact(tmp_path / "x", q, other)


def test_rtn_w3_and_grouped_artifacts_load_through_qvla_quant_load(tiny_pi0, tiny_batches, tmp_path):
    from qvla_quant import load, save
    from qvla_quant.roles import PlanTemplate
    from qvla_quant.transforms import packed_layers

    template = PlanTemplate()
    spec = [i for i in tiny_pi0.layers()
            if template.rule_for(i.name, i.role) == "auto"]  # fmt: skip
    noise = tiny_pi0.make_noise(2, 0)
    for plan in (uniform_plan(spec, 3), grouped_plan(spec, 2, 64), grouped_plan(spec, 4, 128)):
        path = save(tmp_path / plan.method, tiny_pi0, plan)
        adapter = load(path)
        layers = dict(packed_layers(adapter.model))
        assert set(layers) == set(plan.layers)
        for name, lp in plan.layers.items():
            assert torch.equal(layers[name].row_bits(), lp.bits_tensor())
            assert torch.equal(layers[name].row_grouped(), lp.grouped_tensor())
        reference = quantize_model(tiny_pi0.model, plan, inplace=False)
        with torch.no_grad():
            ref = type(tiny_pi0)(reference, action_dim=tiny_pi0.action_dim).actions(tiny_batches[0], noise)
            got = adapter.actions(tiny_batches[0], noise)
        assert torch.equal(got, ref), plan.method


@pytest.mark.gpu
def test_every_kind_on_cuda_matches_its_reference():
    torch.manual_seed(0)
    lin = nn.Linear(300, 37).cuda()
    lp = mixed_layer_plan("x", 37, 300, 64, seed=5)
    layer = PackedLinear.from_float(lin, lp.bits, group_size=64, grouped=lp.grouped)
    assert layer.qweight_3g.is_cuda and layer.row_index.is_cuda
    assert torch.equal(layer.row_bits(), lp.bits_tensor()) and torch.equal(layer.row_grouped(), lp.grouped_tensor())
    w_ref = fake_quantize_weight(lin.weight, lp.bits, group_size=64, grouped=lp.grouped)
    assert torch.equal(layer.dequantized_weight(), w_ref)
    x = torch.randn(4, 300, device="cuda")
    ref = F.linear(x, w_ref, lin.bias)
    assert (layer(x) - ref).abs().max() <= 1e-3 * ref.abs().max()  # TF32 may be on for CUDA matmuls


# ---- the choice: calibration with grouped columns, allocation between per-row and grouped rows


@pytest.fixture(scope="module")
def grouped_sensitivity(tiny_pi0_dir, tiny_batches, tiny_calibration, tmp_path_factory):
    """The tiny π0 calibrated with group_size 64: its K = 128 and 192 layers have 2 and 3 groups, the others one."""
    from qvla_quant import calibrate
    from qvla_quant.api import load_policy

    store = tmp_path_factory.mktemp("grouped_sens")
    config = CalibrationConfig(group_size=64, store_dir=str(store), **tiny_calibration)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_thread (this fixture outlives the per-test one)
    try:
        return calibrate(load_policy(tiny_pi0_dir), tiny_batches, config), store, config
    finally:
        torch.set_num_threads(threads)


def test_group_size_in_the_configs():
    config = CalibrationConfig(group_size=128)
    assert config.grouped_bits == (2, 4) and config.result_key()["group_size"] == 128
    assert CalibrationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # left out at its default: configs, stores and plans without groups write what they always did
    assert "group_size" not in CalibrationConfig().to_dict() and CalibrationConfig().grouped_bits == ()
    assert "groups" not in AllocationConfig().to_dict()
    assert AllocationConfig(groups=False).to_dict()["groups"] is False
    assert AllocationConfig.from_dict(AllocationConfig(groups=False).to_dict()) == AllocationConfig(groups=False)
    for bad, match in (
        (lambda: CalibrationConfig(group_size=100), r"CalibrationConfig.group_size must be one of \(64, 128, 256\)"),
        (lambda: CalibrationConfig(group_size=True), "CalibrationConfig.group_size"),
        (lambda: CalibrationConfig(bits=(0, 8, 16), group_size=64), "none of the calibrated bits"),
        (lambda: AllocationConfig(groups="yes"), "AllocationConfig.groups"),
    ):
        with pytest.raises(ValueError, match=match):
            bad()


def test_calibration_measures_the_grouped_variants(grouped_sensitivity, tiny_pi0, tiny_batches, monkeypatch):
    from qvla_quant import Sensitivity, calibrate
    from qvla_quant import sensitivity as S

    sens, store, config = grouped_sensitivity
    labels = ["0", "2", "4", "8", "16", "2g", "4g"]
    assert sens.group_size == 64 and [c.label for c in sens.choices] == labels
    assert sens.bit_index(4) == 2 and sens.choice_index("4g") == 6
    index = json.loads((store / "index.json").read_text())
    assert index["format_version"] == 3 and index["group_size"] == 64 and index["choices"] == labels
    assert set(sens.proxy_scale) == {0, 2, 4, 8, "2g", "4g"}
    assert set(sens.report["rank_correlation"]["aligned"]) >= {"all", "2", "2g", "4g"}
    multi = [n for n, layer in sens.layers.items() if layer.fan_in > 64 and not layer.dead]
    assert len(multi) == 2  # the K = 192 patch conv and the live K = 128 down_proj (the other one is dead)
    for name, layer in sens.layers.items():
        v = sens.values(name)
        assert v.shape == (layer.out_features, 7) and torch.isfinite(v).all() and (v[:, 4] == 0).all()
        if layer.exact is not None and not layer.dead:
            measured = torch.isfinite(layer.exact[:, [0, 1, 2, 3, 5, 6]])
            assert torch.equal(measured.any(1), measured.all(1)), name  # whole rows, grouped columns included
        if layer.fan_in <= 64:  # one group: the grouped variant is the per-row row, measured once and copied
            for table in (layer.proxy_aligned, layer.proxy_gain, layer.exact, v):
                torch.testing.assert_close(table[:, [5, 6]], table[:, [1, 2]], rtol=0, atol=0, equal_nan=True)
    # the grouped exact values are Eq. 4 of the grouped row: against the weight-copy brute force
    wcfg = config.weight
    data = S._prepare(tiny_pi0, tiny_batches, 0)
    for name in multi:
        info = next(i for i in tiny_pi0.layers() if i.name == name)
        # what the grouped columns perturb the rows by: row_choice_error "bg", smaller than per-row here
        dw = S._errors(info, ["2", "2g", "4", "4g"], wcfg, 64).pow(2).sum((1, 2))
        assert dw[1] < dw[0] and dw[3] < dw[2]
        jobs = [(0, "2g"), (3, "4g"), (1, "2"), (2, "2g")]
        hooked = S.exact_sensitivity(tiny_pi0, data, info, jobs, ("2", "2g", "4g"), wcfg, channels_per_pass=3,
                                     group_size=64)  # fmt: skip
        brute = [S.brute_force_sensitivity(tiny_pi0, tiny_batches, name, r, c, wcfg, group_size=64) for r, c in jobs]
        torch.testing.assert_close(hooked, torch.tensor(brute, dtype=torch.float64), rtol=2e-3, atol=1e-12)
    with pytest.raises(ValueError, match="give the group_size"):
        S.exact_sensitivity(tiny_pi0, data, info, [(0, "2g")], ("2g",), wcfg)
    # the store reads back the same, resumes without measuring, and refuses other group settings
    again = Sensitivity.load(store)
    assert again.choices == sens.choices and again.proxy_scale == sens.proxy_scale
    for name in sens.layers:
        assert torch.equal(again.values(name), sens.values(name))
    monkeypatch.setattr(S, "proxy_sensitivity", lambda *a, **k: pytest.fail("a finished store was recomputed"))
    monkeypatch.setattr(S, "exact_sensitivity", lambda *a, **k: pytest.fail("a finished store was recomputed"))
    resumed = calibrate(tiny_pi0, tiny_batches, config)
    assert resumed.choices == sens.choices
    for other in (None, 128):
        with pytest.raises(ValueError, match="different config"):
            calibrate(tiny_pi0, tiny_batches, CalibrationConfig(**{**config.__dict__, "group_size": other}))


@pytest.mark.parametrize("budget", [3.0, 2.5])
def test_allocation_picks_grouped_rows_within_the_budget(grouped_sensitivity, budget):
    """Both solvers choose per row among all seven columns; the plan counts the grouped rows' overhead, so its
    average is within the budget; the optimum with grouped choices is no worse than without (same tables)."""
    from qvla_quant import allocate

    sens, _, _ = grouped_sensitivity
    errors = {}
    for solver in ("greedy", "lagrangian"):
        for groups in (True, False):
            plan = allocate(sens, budget, AllocationConfig(solver=solver, groups=groups))
            a = plan.info["allocation"]
            assert plan.average_bits() <= budget and a["average_bits"] == pytest.approx(plan.average_bits(), abs=1e-12)
            assert Plan.from_json(plan.to_json()).hash() == plan.hash()
            for lp in plan.layers.values():
                if lp.grouped is not None:
                    assert groups and lp.group_size == 64 and lp.fan_in > 64
                    assert {b for b, f in zip(lp.bits, lp.grouped) if f} <= {2, 4}
            grouped_rows = sum(sum(lp.grouped or []) for lp in plan.layers.values())
            assert a.get("grouped_rows", 0) == grouped_rows and (groups or grouped_rows == 0)
            if solver == "lagrangian":
                assert a["proven_optimal"]
            errors[solver, groups] = a["total_error"]
    assert errors["lagrangian", True] <= errors["lagrangian", False] * (1 + 1e-12)
    assert errors["lagrangian", True] <= errors["greedy", True] * (1 + 1e-12)


def test_allocate_emits_grouped_rows_that_pack_like_their_reference(tiny_pi0, tiny_batches):
    """A sensitivity where the grouped variants are worth their overhead (10x less error than per-row at 2 and 4
    bits): both solvers take them in the layers with more than one group only, at an average within the budget, and
    the plan packs (quantize) to what the fake-quant reference computes."""
    from qvla_quant import Pi0Adapter, Sensitivity, allocate, quantize
    from qvla_quant.roles import PlanTemplate
    from qvla_quant.sensitivity_store import LayerSensitivity
    from qvla_quant.transforms import fake_quantize_model

    template = PlanTemplate()
    infos = [i for i in tiny_pi0.layers() if template.rule_for(i.name, i.role) == "auto"]
    layers = {}
    g = torch.Generator().manual_seed(0)
    for info in infos:
        gain = torch.exp(torch.randn(info.out_features, 1, generator=g, dtype=torch.float64))
        table = gain * torch.tensor([1.0, 0.1, 0.1 / 16, 0.1 / 4096, 0.0, 0.01, 0.01 / 16], dtype=torch.float64)
        layers[info.name] = LayerSensitivity(info.name, info.role, info.kind, info.out_features, info.fan_in,
                                             proxy_aligned=table)  # fmt: skip
    sens = Sensitivity(bits=(0, 2, 4, 8, 16), layers=layers, group_size=64, config={"template": template.to_dict()})
    for solver in ("greedy", "lagrangian"):
        plan = allocate(sens, 2.5, AllocationConfig(solver=solver))
        assert plan.average_bits() <= 2.5, solver
        multi = [lp for lp in plan.layers.values() if lp.fan_in > 64]
        assert all(lp.grouped is None for lp in plan.layers.values() if lp.fan_in <= 64), solver
        grouped = sum(sum(lp.grouped or []) for lp in multi)
        assert grouped > 0.2 * sum(lp.out_features for lp in multi), solver
    batch = tiny_batches[0]
    reference = Pi0Adapter(fake_quantize_model(tiny_pi0.model, plan)).predict(batch)
    quantize(tiny_pi0, plan)
    packed = tiny_pi0.predict(batch)
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-4 * reference.abs().max())


def test_cli_calibrate_with_a_group_size_and_allocate(tiny_pi0_dir, tiny_batches, tmp_path, capsys):
    from qvla_quant.cli import main, save_batches

    save_batches(tmp_path / "data", tiny_batches)
    store, plan = tmp_path / "sens", tmp_path / "plan.json"
    argv = ["calibrate", "--policy", str(tiny_pi0_dir), "--data", str(tmp_path / "data"), "--out", str(store),
            "--exact-fraction", "0.005", "--rank-sample", "16", "--max-exact-dims", "8", "--n-probes", "4",
            "--no-clip-search", "--quiet", "--group-size", "64"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((store / "index.json").read_text())["group_size"] == 64
    for extra in ([], ["--no-groups"]):
        assert main(["allocate", "--sensitivity", str(store), "--budget", "2.5", "--out", str(plan), *extra]) == 0
        p = Plan.from_json(plan.read_text())
        assert p.average_bits() <= 2.5
        assert p.info["allocation"]["config"].get("groups", True) == (not extra)
        if extra:
            assert p.grouped_fraction() == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv[:-1], "100"])
    assert "invalid choice" in capsys.readouterr().err
