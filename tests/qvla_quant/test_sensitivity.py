"""Sensitivity: exact Eq. 4 against a weight-copy brute force, the first-order proxies, two-stage calibration and its
report, the resumable store, hook hygiene, and the cumulative Eq. 5."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qvla_quant
import qvla_quant.sensitivity as S
from qvla_quant import CalibrationConfig, GenericAdapter, Pi0Adapter, Sensitivity, calibrate
from qvla_quant.api import load_policy
from qvla_quant.config import WeightQuantConfig
from qvla_quant.quantizer import RowChoice
from qvla_quant.sensitivity import (
    CalibrationError,
    brute_force_sensitivity,
    cumulative_sensitivity,
    exact_sensitivity,
    proxy_sensitivity,
    spearman,
)

WCFG = WeightQuantConfig()
FORMAT2 = Path(__file__).resolve().parent / "data" / "sensitivity_format2"


def _info(adapter, name):
    return next(i for i in adapter.layers() if i.name == name)


@pytest.mark.parametrize(
    "layer",
    [
        "model.vlm.vision_tower.embeddings.patch_embedding",  # conv, the first layer
        "model.vlm.language_model.layers.0.mlp.down_proj",  # language, feeds the KV cache
        "model.vlm.multi_modal_projector.linear",
        "model.dit.layers.1.self_attn.v_proj",  # action expert: perturbed at every denoising step
    ],
)
def test_exact_equals_brute_force_weight_copy(tiny_pi0, tiny_batches, layer):
    jobs = [(0, 2), (3, 4), (5, 0), (1, 8), (2, 2)]
    data = S._prepare(tiny_pi0, tiny_batches, 0)
    hooked = exact_sensitivity(tiny_pi0, data, _info(tiny_pi0, layer), jobs, (0, 2, 4, 8), WCFG, channels_per_pass=3)
    brute = [brute_force_sensitivity(tiny_pi0, tiny_batches, layer, r, b, WCFG) for r, b in jobs]
    # fp32 forward passes at different batch sizes: equal to ~1e-4 relative, plus a floor for near-zero values
    torch.testing.assert_close(hooked, torch.tensor(brute, dtype=torch.float64), rtol=2e-3, atol=1e-12)
    assert hooked.min() > 0
    assert all(not m._forward_hooks for m in tiny_pi0.model.modules())


# ---- a linear policy: the first-order proxy is exact there
class LinearPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 12)

    def forward(self, x):
        return self.b(self.a(x)).view(-1, 3, 4)


def linear_adapter(seed=0, **kw):
    torch.manual_seed(seed)
    return GenericAdapter(LinearPolicy().eval(), lambda m, b, n: m(b["x"]), role_rules={"re:.*": "language"}, **kw)


def linear_batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(3, 8, generator=g)} for _ in range(n)]


def test_aligned_proxy_is_exact_on_a_linear_policy_and_gain_bounds_it():
    adapter = linear_adapter()
    data = S._prepare(adapter, linear_batches(), 0)
    layers = adapter.layers()
    proxy = proxy_sensitivity(adapter, data, layers, (0, 2, 4, 8), WCFG, max_exact_dims=64)
    assert proxy.probes == "exact" and proxy.dead == []
    for info in layers:
        jobs = [(r, b) for r in range(info.out_features) for b in (0, 2, 4, 8)]
        exact = exact_sensitivity(adapter, data, info, jobs, (0, 2, 4, 8), WCFG).view(info.out_features, 4)
        torch.testing.assert_close(proxy.aligned[info.name], exact, rtol=1e-4, atol=1e-12)
        assert (proxy.gain[info.name] >= proxy.aligned[info.name] * (1 - 1e-6)).all()  # Cauchy-Schwarz


def test_random_projection_proxy_ranks_like_the_exact_one():
    adapter = linear_adapter()
    data = S._prepare(adapter, linear_batches(4), 0)
    info = adapter.layers()[0]
    exact = proxy_sensitivity(adapter, data, [info], (2,), WCFG, max_exact_dims=64).aligned[info.name]
    rand = proxy_sensitivity(adapter, data, [info], (2,), WCFG, max_exact_dims=4, n_probes=64, seed=3)
    assert rand.probes == "random(64)"
    assert spearman(exact, rand.aligned[info.name]) > 0.8
    assert (rand.aligned[info.name] / exact).mean().item() == pytest.approx(1.0, rel=0.3)  # unbiased


def test_two_stage_calibration_of_tiny_pi0(tiny_sensitivity):
    sens, store = tiny_sensitivity
    report = sens.report
    # the last VLM layer's q/o/MLP cannot reach the action: dead, zero, not an error
    assert len(sens.dead_layers) == 5 and all(".language_model.layers.1." in n for n in sens.dead_layers)
    for name in sens.dead_layers:
        assert torch.equal(sens.values(name), torch.zeros_like(sens.values(name)))
    # the default template leaves the projector and the action head out
    roles = {layer.role for layer in sens.layers.values()}
    assert roles == {"vision", "language", "action"}
    # proxy/exact rank correlation on a random sample: reported for both proxies, and positive
    rank = report["rank_correlation"]
    assert rank["aligned"]["n"] == 48 and rank["gain"]["n"] == 48
    assert rank["aligned"]["all"] > 0.5 and rank["gain"]["all"] > 0.5
    assert report["better_proxy"] in ("aligned", "gain")
    # refined channels carry exact values; everything is finite, s(16) = 0
    n_exact = sum(int(torch.isfinite(layer.exact[:, :-1]).sum()) for layer in sens.layers.values() if not layer.dead)
    assert n_exact >= report["n_exact_top"]
    for name in sens.layers:
        v = sens.values(name)
        assert v.shape == (sens.layers[name].out_features, 5) and torch.isfinite(v).all() and (v[:, -1] == 0).all()
    assert set(sens.proxy_scale) == {0, 2, 4, 8}
    # the stored copy reads back identically
    again = Sensitivity.load(store)
    assert again.report == json.loads(json.dumps(report))
    for name in sens.layers:
        assert torch.equal(again.values(name), sens.values(name))


def test_interrupted_calibration_resumes_at_the_next_layer(
    tiny_pi0_dir, tiny_batches, tiny_calibration, tmp_path, monkeypatch
):
    config = CalibrationConfig(store_dir=str(tmp_path / "store"), **tiny_calibration)
    adapter = load_policy(tiny_pi0_dir)
    calls = []
    real = S.exact_sensitivity

    def flaky(*args, **kwargs):
        calls.append(args[2].name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a user pressing Ctrl-C in the middle of the exact stage
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "exact_sensitivity", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(adapter, tiny_batches, config)
    # hooks are gone and parameters are as they were, even though the run died inside a pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.model.modules())
    assert all(p.requires_grad for p in adapter.model.parameters())
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert not index["complete"] and all(m["proxy_done"] for m in index["layers"].values())
    with pytest.raises(ValueError, match="not finished"):
        Sensitivity.load(tmp_path / "store")

    resumed_calls = []
    monkeypatch.setattr(S, "exact_sensitivity", lambda *a, **k: resumed_calls.append(a[2].name) or real(*a, **k))
    monkeypatch.setattr(S, "proxy_sensitivity", lambda *a, **k: pytest.fail("the proxy stage was already stored"))
    resumed = calibrate(adapter, tiny_batches, config)
    assert calls[2] == resumed_calls[0] and not set(calls[:2]) & set(resumed_calls)

    monkeypatch.setattr(S, "exact_sensitivity", real)
    monkeypatch.undo()
    fresh = calibrate(load_policy(tiny_pi0_dir), tiny_batches, CalibrationConfig(**tiny_calibration))
    for name in fresh.layers:
        torch.testing.assert_close(resumed.values(name), fresh.values(name), rtol=1e-9, atol=0)


def test_store_refuses_other_settings_or_data(tiny_sensitivity, tiny_pi0_dir, tiny_batches, tiny_calibration):
    _, store = tiny_sensitivity
    adapter = load_policy(tiny_pi0_dir)
    other_seed = CalibrationConfig(store_dir=str(store), **{**tiny_calibration, "rank_sample": 8})
    with pytest.raises(ValueError, match="different config"):
        calibrate(adapter, tiny_batches, other_seed)
    same = CalibrationConfig(store_dir=str(store), **tiny_calibration)
    with pytest.raises(ValueError, match="calibration data"):
        calibrate(adapter, tiny_batches[:1], same)


def test_a_store_written_before_configs_carried_a_version_still_resumes(
    tiny_sensitivity, tiny_pi0_dir, tiny_batches, tiny_calibration, tmp_path, monkeypatch
):
    sens, store = tiny_sensitivity
    old = tmp_path / "old_store"
    shutil.copytree(store, old)
    index = json.loads((old / "index.json").read_text())

    def strip_versions(d):
        if isinstance(d, dict):
            return {k: strip_versions(v) for k, v in d.items() if k != "version"}
        return d

    # the resume key is version-free, so it is the same before and after configs carried a version
    assert "version" not in json.dumps(index["config"])
    index = strip_versions(index)  # the whole index as qvla_quant wrote it before (the full config too)
    (old / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(S, "proxy_sensitivity", lambda *a, **k: pytest.fail("a finished store was recomputed"))
    monkeypatch.setattr(S, "exact_sensitivity", lambda *a, **k: pytest.fail("a finished store was recomputed"))
    again = calibrate(
        load_policy(tiny_pi0_dir), tiny_batches, CalibrationConfig(store_dir=str(old), **tiny_calibration)
    )
    for name in sens.layers:
        assert torch.equal(again.values(name), sens.values(name))


def test_the_result_types_do_not_load_the_calibration():
    """`allocate` needs a Sensitivity, not the algorithm: qvla_quant.sensitivity_store must not import
    qvla_quant.sensitivity (the package's __init__ is bypassed here, since it imports everything)."""
    code = (
        "import json, sys, types\n"
        "pkg = types.ModuleType('qvla_quant')\n"
        f"pkg.__path__ = [{str(Path(qvla_quant.__file__).parent)!r}]\n"
        "sys.modules['qvla_quant'] = pkg\n"
        "import qvla_quant.sensitivity_store\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('qvla_quant'))))\n"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert "qvla_quant.sensitivity_store" in loaded and "qvla_quant.sensitivity" not in loaded
    assert not any(m.startswith("qvla_quant.adapters") for m in loaded)


def test_failed_calibration_leaves_no_hooks():
    adapter = linear_adapter()
    calls = {"n": 0}

    def actions(model, batch, noise):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("camera unplugged")
        return model(batch["x"])

    adapter.actions_fn = actions
    with pytest.raises(RuntimeError, match="camera unplugged"):
        calibrate(adapter, linear_batches(), CalibrationConfig(progress=False))
    assert all(not m._forward_hooks for m in adapter.model.modules())
    assert all(p.requires_grad for p in adapter.model.parameters())


def test_layer_that_is_not_batch_major_is_a_clear_error():
    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 2)

        def forward(self, x):  # x [B, T=3, 4] processed as [T, B, 4]
            return self.proj(x.transpose(0, 1)).transpose(0, 1)

    adapter = GenericAdapter(TimeMajor(), lambda m, b, n: m(b["x"]), role_rules={"proj": "action"})
    data = S._prepare(adapter, [{"x": torch.randn(2, 3, 4)}], 0)
    with pytest.raises(CalibrationError, match="batch-major"):
        exact_sensitivity(adapter, data, adapter.layers()[0], [(0, 2), (1, 2)], (2,), WCFG)
    assert not adapter.model.proj._forward_hooks


def test_cumulative_sensitivity_sums_norms_over_each_episode():
    adapter = linear_adapter()
    episodes = [linear_batches(3, seed=s) for s in range(2)]  # 2 episodes x 3 batches x 3 steps
    info = adapter.layers()[0]
    jobs = {info.name: [(0, 2), (1, 4), (2, 0)]}
    got = cumulative_sensitivity(adapter, episodes, jobs)[info.name]
    # by hand: copy the weight, sum the per-step deviation norms per episode, average over episodes
    expected = []
    for row, bits in jobs[info.name]:
        total = 0.0
        for episode in episodes:
            with torch.no_grad():
                ref = [adapter.actions(b, None) for b in episode]
                w = info.module.weight
                saved = w.clone()
                w[row] += S.row_quantization_error(w, bits, WCFG)[row]
                pert = [adapter.actions(b, None) for b in episode]
                w.copy_(saved)
            total += sum(float((p - r).flatten(1).norm(dim=1).sum()) for p, r in zip(pert, ref))
        expected.append(total / len(episodes))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    # Eq. 5 and Eq. 4 rank these channels alike
    data = S._prepare(adapter, [b for e in episodes for b in e], 0)
    eq4 = exact_sensitivity(adapter, data, info, jobs[info.name], (0, 2, 4), WCFG)
    assert spearman(eq4, got) == pytest.approx(1.0)


def test_calibration_config_validates_and_round_trips():
    config = CalibrationConfig(bits=(8, 2), proxy="gain", exact_fraction=0.1, weight=WeightQuantConfig(clip_grid=5))
    assert config.bits == (2, 8, 16)  # 16 is always there, sorted
    again = CalibrationConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    for bad, match in [
        (dict(bits=(5,)), "not in"),  # 3 and 6 are row widths of the format (opt-in); 5 is none
        (dict(method="fast"), "method"),
        (dict(proxy="hessian"), "proxy"),
        (dict(exact_fraction=1.5), "exact_fraction"),
        (dict(channels_per_pass=0), "channels_per_pass"),
        (dict(bits=(16,)), "at least one"),
    ]:
        with pytest.raises(ValueError, match=match):
            CalibrationConfig(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        CalibrationConfig.from_dict({"bitz": [2]})


def test_spearman_edge_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_exact_and_proxy_only_methods():
    adapter = linear_adapter()
    batches = linear_batches()
    exact = calibrate(adapter, batches, CalibrationConfig(method="exact", progress=False))
    proxy = calibrate(adapter, batches, CalibrationConfig(method="proxy", rank_sample=10, progress=False))
    data = S._prepare(adapter, batches, 0)
    for info in adapter.layers():
        jobs = [(r, b) for r in range(info.out_features) for b in (0, 2, 4, 8)]
        brute = exact_sensitivity(adapter, data, info, jobs, (0, 2, 4, 8), WCFG).view(info.out_features, 4)
        assert torch.equal(exact.values(info.name)[:, :4], brute)
        assert exact.layers[info.name].proxy_aligned is None
        # a linear policy: the proxy-only values equal the exact ones up to rounding
        torch.testing.assert_close(proxy.values(info.name)[:, :4], brute, rtol=1e-4, atol=1e-12)
    assert "rank_correlation" not in exact.report and proxy.report["n_exact_top"] == 0
    assert proxy.report["n_rank_sample"] == 10


def test_proxy_scale_is_fitted_on_the_random_sample_and_rows_stay_consistent(monkeypatch):
    """Issue 11.4: a proxy that over-ranks a few channels (x50) and under-reads the rest (x0.5, true scale 2). The top
    picks are exactly the over-ranked ones, so a fit on them gives ~0.02; the random sample's rows give 2. Every row
    is then all exact or all proxy-scaled."""
    real = S.proxy_sensitivity
    over = [0, 1, 2]

    def skewed(*args, **kwargs):
        res = real(*args, **kwargs)
        for table in (res.aligned, res.gain):
            for name in table:
                table[name] = table[name] * 0.5
                if name == "a":
                    table[name][over] *= 100.0
        return res

    monkeypatch.setattr(S, "proxy_sensitivity", skewed)
    adapter = linear_adapter()
    batches = linear_batches()
    config = CalibrationConfig(exact_fraction=0.1, rank_sample=12, seed=1, progress=False)
    sens = calibrate(adapter, batches, config)
    report = sens.report
    assert report["n_exact_top"] == 3 * 4
    for b in (0, 2, 4, 8):
        assert sens.proxy_scale[b] == pytest.approx(2.0, rel=1e-3)
    assert report["proxy_scale_fit"] == "random sample"
    data = S._prepare(adapter, batches, 0)
    for info in adapter.layers():
        exact = sens.layers[info.name].exact[:, :4]
        measured = torch.isfinite(exact)
        assert torch.equal(measured.any(1), measured.all(1))  # whole rows, never a mix
        jobs = [(r, b) for r in range(info.out_features) for b in (0, 2, 4, 8)]
        truth = exact_sensitivity(adapter, data, info, jobs, (0, 2, 4, 8), WCFG).view(info.out_features, 4)
        v = sens.values(info.name)[:, :4]
        if info.name == "a":
            assert measured[over].all()  # the over-ranked rows are the top picks, measured exactly
        # exact rows are exact; the others are the proxy times the recovered scale: the truth on a linear policy
        torch.testing.assert_close(v, truth, rtol=1e-3, atol=1e-12)
    # a partially measured row (e.g. an old or hand-edited table) is read all-proxy, not mixed
    layer = sens.layers["b"]
    row = int(torch.isfinite(layer.exact[:, 0]).nonzero()[0])
    layer.exact[row, 1] = float("nan")
    scale = torch.tensor([sens.proxy_scale.get(b, 1.0) for b in sens.bits], dtype=torch.float64)
    expect = layer.proxy_aligned[row] * scale
    expect[-1] = 0.0
    assert torch.equal(sens.values("b")[row], expect)


def test_pi0_prefix_cache_reproduces_actions_and_is_not_mutated(tiny_pi0, tiny_batches):
    batch = tiny_pi0.repeat_batch(tiny_batches[0], 3)
    noise = tiny_pi0.make_noise(6, 5)
    with torch.no_grad():
        full = tiny_pi0.actions(batch, noise)
        prefix = tiny_pi0.prefix_cache(batch)
        before = [(k.clone(), v.clone()) for k, v in prefix.kv]
        first = tiny_pi0.actions_from_prefix(prefix, batch, noise)
        second = tiny_pi0.actions_from_prefix(prefix, batch, noise)
    assert torch.equal(first, full) and torch.equal(second, full)  # the same operations: bit for bit
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(prefix.kv, before))
    assert tiny_pi0.downstream_of_prefix("model.dit.layers.0.mlp.up_proj")
    assert tiny_pi0.downstream_of_prefix("action_out_proj")
    assert not tiny_pi0.downstream_of_prefix("model.vlm.language_model.layers.0.self_attn.k_proj")
    assert not tiny_pi0.downstream_of_prefix("model.vlm.vision_tower.embeddings.patch_embedding")
    # the generic fallback recomputes
    adapter = linear_adapter()
    x = linear_batches(1)[0]
    assert adapter.prefix_cache(x) is None
    assert torch.equal(adapter.actions_from_prefix(None, x, None), adapter.model(x["x"]))


def test_pi0_action_steps_counts_only_the_executed_steps(tiny_pi0, tiny_batches):
    # the objective over the chunk's first steps (those executed before the next prediction): the same numbers as
    # the whole chunk's first steps, by both paths, and a sensitivity that sees only them
    batch = tiny_batches[0]
    noise = tiny_pi0.make_noise(2, 3)
    short = Pi0Adapter(tiny_pi0.model, action_dim=tiny_pi0.action_dim, action_steps=2)
    with torch.no_grad():
        full = tiny_pi0.actions(batch, noise)
        first = short.actions(batch, noise)
        via_prefix = short.actions_from_prefix(short.prefix_cache(batch), batch, noise)
    assert full.shape[1] == tiny_pi0.model.config.chunk_size and first.shape[1] == 2
    assert torch.equal(first, full[:, :2]) and torch.equal(via_prefix, first)
    restored = Pi0Adapter.from_config(short.config_dict(), model=tiny_pi0.model)
    assert restored.action_steps == 2 and "action_steps" not in tiny_pi0.config_dict()
    with pytest.raises(ValueError, match="action_steps must be in"):
        Pi0Adapter(tiny_pi0.model, action_steps=tiny_pi0.model.config.chunk_size + 1)
    config = CalibrationConfig(exact_fraction=0.0, rank_sample=0, max_exact_dims=8, n_probes=2, progress=False)
    whole = calibrate(tiny_pi0, tiny_batches[:1], config)
    executed = calibrate(short, tiny_batches[:1], config)
    name = "model.dit.layers.0.mlp.down_proj"
    assert not torch.equal(whole.values(name), executed.values(name))


def test_exact_passes_over_the_action_expert_reuse_the_vlm_prefix(tiny_pi0, tiny_batches, tiny_calibration):
    """Issue 11.5: the VLM runs once per (batch, replica count) for the expert's layers, not once per pass, and the
    sensitivities are identical (bit for bit) to recomputing everything."""
    calls = {"vlm": 0}
    handle = tiny_pi0.model.model.vlm.register_forward_hook(lambda *a: calls.__setitem__("vlm", calls["vlm"] + 1))
    data = S._prepare(tiny_pi0, tiny_batches, 0)
    jobs = [(r, b) for r in range(7) for b in (2, 4)]  # 14 jobs: passes of 4, 4, 4 and 2 channels
    values = {}
    try:
        for layer in ("model.dit.layers.1.self_attn.v_proj", "model.vlm.language_model.layers.0.mlp.up_proj"):
            info = _info(tiny_pi0, layer)
            for cached in (False, True):
                calls["vlm"] = 0
                prefixes = S._Prefixes(tiny_pi0) if cached else None
                values[layer, cached] = exact_sensitivity(
                    tiny_pi0, data, info, jobs, (0, 2, 4, 8), WCFG, channels_per_pass=4, prefixes=prefixes
                )
                values[layer, cached, "vlm"] = calls["vlm"]
    finally:
        handle.remove()
    dit, vlm = "model.dit.layers.1.self_attn.v_proj", "model.vlm.language_model.layers.0.mlp.up_proj"
    # uncached: references (2 batches x 2 replica counts) + 4 passes x 2 batches; cached: the 2 x 2 prefixes only
    # (the references reuse them too)
    assert values[dit, False, "vlm"] == 4 + 8 and values[dit, True, "vlm"] == 4
    assert values[vlm, True, "vlm"] == values[vlm, False, "vlm"] == 4 + 8  # a VLM layer changes the prefix
    for layer in (dit, vlm):
        assert torch.equal(values[layer, True], values[layer, False]) and values[layer, True].min() > 0
    # the whole calibration: identical sensitivities with and without the cache
    cfgs = [CalibrationConfig(prefix_cache=c, **tiny_calibration) for c in (True, False)]
    assert CalibrationConfig.from_dict(cfgs[0].to_dict()) == cfgs[0] and cfgs[0].result_key() == cfgs[1].result_key()
    cached, full = (calibrate(load_policy_like(tiny_pi0), tiny_batches, c) for c in cfgs)
    assert cached.proxy_scale == full.proxy_scale
    for name in full.layers:
        assert torch.equal(cached.values(name), full.values(name)), name


def load_policy_like(adapter):
    return type(adapter)(adapter.model, action_dim=adapter.action_dim, num_steps=adapter.num_steps)


def test_a_format_2_store_loads_and_resumes_unchanged(tmp_path, monkeypatch):
    """data/sensitivity_format2 was written by qvla_quant before grouped columns existed (commit 6928955: the linear
    policy, linear_batches(), exact_fraction 0.1, rank_sample 10, store_dir "sensitivity_format2"). It loads with
    the values a run now computes, a run with its settings reuses it without measuring anything, an unfinished copy
    resumes at its unfinished layer only, and a store written now without groups is format 2 with the same keys."""
    old_index = json.loads((FORMAT2 / "index.json").read_text())
    assert old_index["format_version"] == 2 and "group_size" not in old_index
    old = Sensitivity.load(FORMAT2)
    assert old.group_size is None and old.choices == tuple(RowChoice(b) for b in (0, 2, 4, 8, 16))
    config = CalibrationConfig(exact_fraction=0.1, rank_sample=10, progress=False)
    fresh = calibrate(linear_adapter(), linear_batches(), config)
    assert fresh.proxy_scale == pytest.approx(old.proxy_scale, rel=1e-9)
    for name in fresh.layers:
        torch.testing.assert_close(fresh.values(name), old.values(name), rtol=1e-9, atol=0)

    store = tmp_path / "store"
    shutil.copytree(FORMAT2, store)
    resumed = dataclasses.replace(config, store_dir=str(store))
    real_exact = S.exact_sensitivity
    monkeypatch.setattr(S, "proxy_sensitivity", lambda *a, **k: pytest.fail("a finished store was recomputed"))
    monkeypatch.setattr(S, "exact_sensitivity", lambda *a, **k: pytest.fail("a finished store was recomputed"))
    again = calibrate(linear_adapter(), linear_batches(), resumed)
    for name in old.layers:
        assert torch.equal(again.values(name), old.values(name))
    assert json.loads((store / "index.json").read_text())["format_version"] == 2  # rewritten, still format 2

    index = json.loads((store / "index.json").read_text())
    index["complete"] = False
    index["layers"]["b"]["exact_done"] = False  # as if interrupted in the exact stage of layer b
    (store / "index.json").write_text(json.dumps(index))
    calls = []
    monkeypatch.setattr(S, "exact_sensitivity", lambda *a, **k: calls.append(a[2].name) or real_exact(*a, **k))
    again = calibrate(linear_adapter(), linear_batches(), resumed)
    assert calls == ["b"]
    for name in old.layers:
        torch.testing.assert_close(again.values(name), old.values(name), rtol=1e-9, atol=0)

    fresh.save(tmp_path / "new")
    new_index = json.loads((tmp_path / "new" / "index.json").read_text())
    assert new_index["format_version"] == 2 and set(new_index) == set(old_index)
    assert set(new_index["calibration_config"]) == set(old_index["calibration_config"])  # no group_size key
    assert new_index["config"] == old_index["config"]
