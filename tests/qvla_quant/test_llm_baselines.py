"""The LLM-derived baselines (AWQ, GPTQ, SmoothQuant, module-wise): each against a small reference computation, and
each as an artifact that loads and runs like QVLA's."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

from qvla_quant import llm_baselines as lb
from qvla_quant.adapters import GenericAdapter
from qvla_quant.config import WeightQuantConfig
from qvla_quant.llm_baselines import InputGroup
from qvla_quant.packed import PackedLinear, unpack_codes
from qvla_quant.quantizer import QUANTIZED_BITS, fake_quantize_rows, fake_quantize_weight
from qvla_quant.transforms import packed_layers

RTN = WeightQuantConfig(clip_search=False)


class MLP(nn.Module):
    """x -> [LayerNorm] -> fc1 -> ReLU -> fc2; the norm's weight can carry outlier channels (as LLM norms do)."""

    def __init__(self, d_in=32, d_hidden=64, d_out=16, norm=False, outliers=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.ln = nn.LayerNorm(d_in) if norm else nn.Identity()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        if norm and outliers:
            with torch.no_grad():
                self.ln.weight[:3] = outliers
                self.ln.bias.normal_(0, 0.1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.ln(x))))


def mlp_adapter(model):
    return GenericAdapter(model, lambda m, batch, noise: m(batch["x"]), role_rules={"re:.*": "language"})


def correlated_batches(n_batches, seed, d=32, tokens=24, batch=4):
    """Inputs with a strongly non-diagonal covariance (what GPTQ's compensation exploits)."""
    gen = torch.Generator().manual_seed(1234)
    mix = torch.randn(d, d, generator=gen) * torch.logspace(0, -1.5, d)[:, None]
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, tokens, d, generator=gen) @ mix} for _ in range(n_batches)]


def layer_error(w_hat, w, x):
    return float(((x @ w_hat.t()) - (x @ w.t())).pow(2).sum(1).mean())


# ---------------------------------------------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_reduces_layer_output_error_vs_rtn_on_a_2_layer_mlp(bits):
    model = MLP().eval()
    calib, held_out = correlated_batches(4, seed=0), correlated_batches(2, seed=1)
    res = lb.gptq(mlp_adapter(model), calib, bits)
    assert res.plan.info["method"] == "gptq" and res.plan.method == f"gptq-w{bits}a16"
    assert set(res.qparams) == {"fc1", "fc2"} and all(v["gptq"] for v in res.plan.info["layers"].values())
    q = res.adapter.model
    for data in (calib, held_out):
        x1 = torch.cat([b["x"].reshape(-1, 32) for b in data])
        x2 = torch.relu(model.fc1(x1)).detach()  # fc2's input in the float model
        for layer, x in (("fc1", x1), ("fc2", x2)):
            w = getattr(model, layer).weight.detach()
            e_gptq = layer_error(getattr(q, layer).weight.detach(), w, x)
            e_rtn = layer_error(fake_quantize_weight(w, torch.full((w.shape[0],), bits), RTN), w, x)
            assert e_gptq < 0.8 * e_rtn, (layer, bits, e_gptq, e_rtn)
        y = torch.cat([model(b["x"]) for b in data]).detach()
        y_gptq = torch.cat([q(b["x"]) for b in data]).detach()
        y_rtn = torch.cat([lb.rtn(mlp_adapter(model), bits).quantize().model(b["x"]) for b in data]).detach()
        assert (y_gptq - y).pow(2).mean() < (y_rtn - y).pow(2).mean()
    assert torch.equal(model.fc1.weight, MLP().fc1.weight)  # the caller's model is untouched


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_codes_survive_packing_exactly(group_size):
    torch.manual_seed(3)
    layer = nn.Linear(160, 24)
    x = correlated_batches(2, seed=2, d=160, tokens=64)[0]["x"].reshape(-1, 160)
    h = 2 * x.t().double() @ x.double() / x.shape[0]
    res = lb.gptq_quantize(layer.weight, h, 4, group_size=group_size)
    assert res.scale.shape == ((24,) if group_size is None else (24, 3))
    target = copy.deepcopy(layer)
    with torch.no_grad():
        target.weight.copy_(res.weight)
    packed = PackedLinear.from_float(
        target,
        [4] * 24,
        group_size=group_size,
        grouped=None if group_size is None else [True] * 24,
        qparams=(res.scale, res.zero),
    )
    assert torch.equal(packed.dequantized_weight(), res.weight)
    sfx = "4" if group_size is None else "4g"  # every row at 4 bits: stored in original order
    assert torch.equal(unpack_codes(getattr(packed, f"qweight_{sfx}"), 4, 160), res.codes)
    assert torch.equal(getattr(packed, f"scale_{sfx}"), res.scale)
    assert torch.equal(getattr(packed, f"zero_{sfx}"), res.zero)
    # why the explicit parameters: the compensated rows need not reach their codes' extremes, so the packer's
    # own min-max of them picks other scales for some rows (here 8 of 24 per-row, 12 grouped)
    plain = PackedLinear.from_float(
        target, [4] * 24, group_size=group_size, grouped=None if group_size is None else [True] * 24
    )
    assert not torch.equal(plain.dequantized_weight(), res.weight)
    with pytest.raises(ValueError, match="qparams: scale"):
        PackedLinear.from_float(target, [4] * 24, qparams=(res.scale[:3], res.zero[:3]))


def test_gptq_model_codes_pack_exactly_at_every_bit_width_and_bad_settings_fail():
    model = MLP(d_in=128, d_hidden=96).eval()  # fc2: K = 96, groups of 64 + 32 columns
    calib = correlated_batches(2, seed=0, d=128)
    for bits, gs in [
        (4, None),
        (2, None),
        (4, 64),
        (2, 128),
        *([(3, None), (3, 64)] if 3 in QUANTIZED_BITS else []),
        (8, None),
    ]:
        res = lb.gptq(mlp_adapter(model), calib, bits, group_size=gs)
        floats = {n: res.adapter.model.get_submodule(n).weight.detach().clone() for n in res.plan.layers}
        res.quantize()
        for name, layer in packed_layers(res.adapter.model):
            assert torch.equal(layer.dequantized_weight(), floats[name]), (bits, gs, name)
    with pytest.raises(ValueError, match="no calibration samples"):
        lb.gptq(mlp_adapter(model), [], 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        lb.gptq(mlp_adapter(model), calib, 5)
    with pytest.raises(ValueError, match="group-wise scales are for rows at"):
        lb.gptq(mlp_adapter(model), calib, 8, group_size=64)


# ---------------------------------------------------------------------------------------------------------------
# AWQ


def test_awq_chosen_alpha_minimizes_its_objective_on_the_grid():
    model = MLP(norm=True, outliers=8.0).eval()
    calib = correlated_batches(3, seed=0)
    group = InputGroup(("fc1",), "ln", "layernorm")
    res = lb.awq(mlp_adapter(model), calib, 4, grid=11, groups=[group])
    (info,) = res.plan.info["groups"]
    assert info["layers"] == ["fc1"] and res.plan.info["layers"]["fc2"]["s"] == 1  # fc2 follows a ReLU: no fold
    # the objective, recomputed from the raw inputs: ||Q(W diag(s)) (x / s) - W x||^2 per token
    x = torch.cat([model.ln(b["x"]).reshape(-1, 32) for b in calib]).detach().double()
    w = model.fc1.weight.detach().double()
    m = x.abs().mean(0)
    losses = []
    for alpha in torch.linspace(0, 1, 11).tolist():
        s = m.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        w_q = fake_quantize_rows((w * s).float(), 4, RTN).double()
        losses.append((((x / s) @ w_q.t() - x @ w.t()).pow(2).sum(1).mean().item(), alpha))
    best_loss, best_alpha = min(losses)
    assert info["alpha"] == pytest.approx(best_alpha) and best_alpha > 0
    assert info["objective"] == pytest.approx(best_loss, rel=1e-4)
    assert info["objective_rtn"] == pytest.approx(losses[0][0], rel=1e-4) and best_loss < losses[0][0]
    # the scales went into the norm and the weights: same float function, and the packed rows are AWQ's
    y = model(calib[0]["x"])
    torch.testing.assert_close(res.adapter.model(calib[0]["x"]), y, rtol=1e-5, atol=1e-5)
    assert res.plan.info["fold_check_rel"] < 1e-5
    with pytest.raises(ValueError, match="bits must be one of"):
        lb.awq(mlp_adapter(model), calib, 16)
    with pytest.raises(ValueError, match="no calibration samples"):
        lb.awq(mlp_adapter(model), iter([]), 4)


# ---------------------------------------------------------------------------------------------------------------
# folding


def test_folding_keeps_the_float_pi0_equal(tiny_pi0, tiny_batches):
    groups = lb.input_groups(tiny_pi0)
    kinds = {g.producer_kind for g in groups if g.foldable}
    assert kinds == {"layernorm", "gemma_rmsnorm", "linear"}
    o_proj = [g for g in groups if g.consumers[0].endswith("o_proj")]
    assert o_proj and all(not g.foldable and "KV cache" in g.reason for g in o_proj)
    assert any(g.producer and g.producer.endswith("v_proj") and g.consumers[0].endswith("out_proj") for g in groups)
    assert any(g.producer and g.producer.endswith("up_proj") for g in groups)
    named = {c for g in groups for c in g.consumers}
    assert named == {info.name for info in tiny_pi0.layers()}  # every layer in exactly one group
    folded = copy.deepcopy(tiny_pi0.model)
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        if g.foldable:
            width = folded.get_submodule(g.consumers[0]).in_features
            lb.fold_input_scale(folded, g, torch.exp(torch.empty(width).uniform_(-1, 1, generator=gen)))
    after = copy.copy(tiny_pi0)
    after.model = folded
    batch = tiny_batches[0]
    assert lb.check_fold(tiny_pi0, after, batch, "test") < 1e-5
    changed = [n for (n, p), q in zip(tiny_pi0.model.named_parameters(), folded.parameters()) if not torch.equal(p, q)]
    assert any("input_layernorm" in n for n in changed) and any("layer_norm1" in n for n in changed)


def test_folding_into_a_linear_and_wrong_groups():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 5)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(7, 8)
    y = model(x)
    lb.fold_input_scale(model, InputGroup(("b",), "a", "linear"), torch.rand(12) + 0.5)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    adapter = GenericAdapter(model, lambda m, batch, noise: m(batch["x"]), role_rules={"re:.*": "language"})
    with pytest.raises(ValueError, match="in two input groups"):
        lb.input_groups(adapter, [InputGroup(("b",), "a", "linear"), InputGroup(("b",))])
    with pytest.raises(ValueError, match="must be an nn.Linear with 8 outputs"):
        lb.input_groups(adapter, [InputGroup(("a",), "b", "linear")])
    with pytest.raises(ValueError, match="producer_kind must be one of"):
        InputGroup(("b",), "a", "conv")


# ---------------------------------------------------------------------------------------------------------------
# SmoothQuant


def test_smoothquant_w8a8_beats_plain_w8a8_on_activation_outliers():
    model = MLP(norm=True, outliers=60.0).eval()
    calib, held_out = correlated_batches(3, seed=0), correlated_batches(2, seed=5)
    group = InputGroup(("fc1",), "ln", "layernorm")
    smooth = lb.smoothquant(mlp_adapter(model), calib, 8, groups=[group])
    plain = lb.rtn(mlp_adapter(model), 8, activation_bits=8)
    assert smooth.plan.quant.activation.bits == plain.plan.quant.activation.bits == 8
    assert smooth.plan.method == "smoothquant-w8a8" and smooth.plan.info["alpha"] == 0.5
    s_min, s_max = smooth.plan.info["groups"][0]["s_range"]
    assert s_max / s_min > 5  # the outlier channels were migrated
    qs, qp = smooth.quantize().model, plain.quantize().model
    x = torch.cat([b["x"] for b in held_out])
    y = model(x).detach()
    err_smooth, err_plain = (qs(x) - y).pow(2).mean(), (qp(x) - y).pow(2).mean()
    assert err_smooth < 0.7 * err_plain, (err_smooth, err_plain)


# ---------------------------------------------------------------------------------------------------------------
# module-wise


def test_module_wise_plan_has_the_bits_of_each_role(tiny_pi0):
    res = lb.module_wise(tiny_pi0)
    plan = res.plan
    roles = {info.name: info.role for info in tiny_pi0.layers()}
    assert set(plan.roles()) == {"vision", "language", "action"}  # projector and action head stay in fp
    for name, lp in plan.layers.items():
        assert set(lp.bits) == {lb.DEFAULT_MODULE_BITS[roles[name]]}
    assert plan.average_bits("vision") == 4 and plan.average_bits("language") == plan.average_bits("action") == 8
    assert 4 < plan.average_bits() < 8 and plan.budget == plan.average_bits()
    assert plan.info["role_bits"] == {"action": 8, "language": 8, "vision": 4}
    custom = lb.module_wise_plan(plan, {"vision": 8, "language": 4, "action": 2})
    assert custom.average_bits("action") == 2 and custom.method == "module-action2-language4-vision8"
    with pytest.raises(ValueError, match=r"no bit-width for role\(s\) \['action'\]"):
        lb.module_wise_plan(plan, {"vision": 4, "language": 8})
    with pytest.raises(ValueError, match="must be one of"):
        lb.module_wise_plan(plan, {"vision": 5, "language": 8, "action": 8})


# ---------------------------------------------------------------------------------------------------------------
# artifacts: every method saves, loads through qvla_quant.load and runs like the packed model it wrote


@pytest.mark.parametrize("method,bits", [("awq", 4), ("gptq", 4), ("smoothquant", 8), ("module", None), ("rtn", 4)])
def test_each_baseline_artifact_loads_and_runs(method, bits, tiny_pi0, tiny_batches, tmp_path):
    import qvla_quant

    res = lb.run_baseline(method, tiny_pi0, tiny_batches, bits=bits)
    assert res.plan.info["method"] == method
    path = res.save(tmp_path / method)
    assert not any(True for _ in packed_layers(res.adapter.model))  # save packed a copy
    loaded = qvla_quant.load(path)
    plan = json.loads((path / "plan.json").read_text())
    assert plan["method"] == res.plan.method and plan["info"] == json.loads(json.dumps(res.plan.info))
    batch = tiny_batches[1]
    expected = res.quantize().predict(batch)
    torch.testing.assert_close(loaded.predict(batch), expected, rtol=0, atol=0)
    reference = tiny_pi0.predict(batch)
    assert 0 < float((expected - reference).abs().max()) < 0.5 * float(reference.abs().max())


def test_gptq_artifact_runs_in_the_policy_runtime(tmp_path):
    pytest.importorskip("tokenizers")
    import numpy as np

    from qvla_quant.adapters.pi0 import example_batch
    from qvla_ros.policy.quantize import policy_adapter
    from qvla_ros.policy.runtime import PolicyRuntime
    from qvla_ros.policy.tiny import CAMERAS, make_tiny_policy
    from qvla_ros.policy.types import Observation

    policy = make_tiny_policy(tmp_path / "fp", seed=1)
    _, adapter = policy_adapter(policy)
    batches = [example_batch(adapter.model.config, 2, n_cameras=3, seed=s) for s in (0, 1)]
    out = lb.gptq(adapter, batches, 4).save(tmp_path / "gptq")
    for name in ("processor.json", "tokenizer.json"):
        shutil.copy2(policy / name, out / name)
    rng = np.random.default_rng(0)
    obs = Observation(
        images={c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in CAMERAS},
        state=rng.normal(0, 0.3, 14),
        instruction="transfer the cube",
    )
    chunk = PolicyRuntime.load(out).predict(obs)
    fp = PolicyRuntime.load(policy).predict(obs)
    assert chunk.actions.shape == fp.actions.shape and np.isfinite(chunk.actions).all()
    assert 0 < np.abs(chunk.actions - fp.actions).max() < 1.0


def test_cli_baseline_writes_an_artifact(tiny_pi0_dir, tiny_batches, tmp_path, capsys):
    import qvla_quant
    from qvla_quant.cli import main, save_batches

    save_batches(tmp_path / "data", tiny_batches)
    rc = main(
        [
            "baseline",
            "--method",
            "gptq",
            "--bits",
            "2",
            "--policy",
            str(tiny_pi0_dir),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "art"),
        ]
    )
    assert rc == 0 and "gptq-w2a16" in capsys.readouterr().out
    assert qvla_quant.load(tmp_path / "art").predict(tiny_batches[0]).shape[0] == 2
    rc = main(
        [
            "baseline",
            "--method",
            "module",
            "--bits",
            "vision=8,language=4,action=4",
            "--policy",
            str(tiny_pi0_dir),
            "--out",
            str(tmp_path / "mod"),
        ]
    )
    assert rc == 0
    assert main(["baseline", "--method", "awq", "--policy", str(tiny_pi0_dir), "--out", str(tmp_path / "x")]) == 2
    assert "pass --data" in capsys.readouterr().err
    assert (
        main(
            [
                "baseline",
                "--method",
                "module",
                "--bits",
                "vision",
                "--policy",
                str(tiny_pi0_dir),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
