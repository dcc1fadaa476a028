"""Allocation: the paper's staged greedy demotion meets the budget exactly, with guards and deterministic ties; the
Lagrangian solver and the dual lower bound measure how far greedy is from the optimum of Eq. 7."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from qvla_quant import AllocationConfig, BudgetError, PlanTemplate, allocate
from qvla_quant.allocation import AllocationProblem, LayerMeta, greedy_allocate, lagrangian_allocate, solve

BITS = (0, 2, 4, 8, 16)


def random_tables(seed=0, n_layers=12):
    """Sensitivities shaped like measured ones: a log-normal gain per channel (sigma 2) and per layer, times an
    error that falls 4x per extra bit (16x per 2 bits) with 30% log-normal noise; pruning costs the most."""
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for layer in range(n_layers):
        out = int(torch.randint(16, 200, (1,), generator=g))
        fan_in = int(torch.randint(16, 512, (1,), generator=g))
        gain = torch.exp(2.0 * torch.randn(out, generator=g) + torch.randn(1, generator=g))
        noise = torch.exp(0.3 * torch.randn(out, 4, generator=g))
        s = torch.zeros(out, 5, dtype=torch.float64)
        s[:, 0] = gain * noise[:, 0]
        s[:, 1] = gain * 0.1 * noise[:, 1]
        s[:, 2] = gain * 0.1 / 16 * noise[:, 2]
        s[:, 3] = gain * 0.1 / 4096 * noise[:, 3]
        tables[f"layer{layer:02d}"] = (fan_in, s)
    return tables


def problem(tables, budget, **config):
    return AllocationProblem.from_tables(tables, BITS, budget, AllocationConfig(**config))


@pytest.mark.parametrize("budget", [8, 6, 4, 3, 2.5, 1.5])
def test_greedy_meets_the_budget_exactly(budget):
    p = problem(random_tables(), budget)
    result = greedy_allocate(p)
    average = p.total_bits(result.bits) / p.n_weights
    # the guarantee: at most the budget, and less than one row's last demotion below it
    assert average <= budget
    assert budget - average < result.info["last_step_bits_per_weight"]
    assert result.info["demotions"] > 0


def test_greedy_is_staged_like_the_paper():
    tables = random_tables()
    # budget 6: every channel passes 16 -> 8 before any goes to 4, so only 8 and 4 appear
    bits = greedy_allocate(problem(tables, 6)).bits
    assert set(bits.unique().tolist()) == {4, 8}
    # budget 8: exactly the 16 -> 8 stage done
    assert set(greedy_allocate(problem(tables, 8)).bits.unique().tolist()) == {8}
    # and within a stage the lowest rho goes first: every 4-bit channel has rho <= every 8-bit one
    p = problem(tables, 6)
    rho = (p.s[:, 2] - p.s[:, 3]) / (4 * p.fan)
    assert rho[bits == 4].max() <= rho[bits == 8].min()


def test_greedy_breaks_ties_by_layer_name_then_row():
    s = torch.zeros(4, 5, dtype=torch.float64)
    s[:, :4] = 1.0  # every channel alike, nothing dead
    tables = {"b_layer": (10, s.clone()), "a_layer": (10, s.clone())}
    bits = greedy_allocate(problem(tables, 14)).bits  # 2 of the 8 rows must go to 8 bits
    layer_a = [i for i, m in enumerate(problem(tables, 14).layers) if m.name == "a_layer"][0]
    p = problem(tables, 14)
    demoted = [(p.layers[int(p.layer_of[i])].name, int(p.row[i])) for i in (bits == 8).nonzero().squeeze(1)]
    assert demoted == [("a_layer", 0), ("a_layer", 1)] and layer_a == 1
    assert torch.equal(bits, greedy_allocate(problem(tables, 14)).bits)


def test_dead_rows_are_pruned_first_and_exempt_from_the_cap():
    tables = random_tables(n_layers=3)
    fan_in, s = tables["layer00"]
    s = s.clone()
    s[:10] = 0.0  # ten dead rows
    tables["layer00"] = (fan_in, s)
    p = problem(tables, 15.0, max_pruned_fraction=0.0)
    bits = greedy_allocate(p).bits
    first = (p.layer_of == 0).nonzero().squeeze(1)
    assert (bits[first[:10]] == 0).all()  # pruned although the cap allows no pruning
    assert p.total_bits(bits) <= p.limit


def test_pruning_guards():
    tables = random_tables(n_layers=4)
    p = problem(tables, 1.2, max_pruned_fraction=0.5)
    bits = greedy_allocate(p).bits
    for li, meta in enumerate(p.layers):
        rows = bits[p.layer_of == li]
        assert int((rows == 0).sum()) <= meta.out_features // 2
    threshold = float(p.s[:, 0].median())
    p = problem(tables, 1.5, max_pruned_fraction=1.0, prune_threshold=threshold)
    bits = greedy_allocate(p).bits
    assert (bits[p.s[:, 0] > threshold] != 0).all()
    assert ((bits == 0) & (p.s[:, 0] <= threshold)).any()


def test_the_pruning_stage_prunes_the_least_sensitive_rows_first():
    # hand-made: four rows alike at 2..16 bits, pruning costs 4, 1, 3, 2; budget 1 bit/weight after the 2-bit stage
    # (2 bits/weight) needs two rows pruned: the two cheapest (rows 1 and 3), not the first two
    s = torch.zeros(4, 5, dtype=torch.float64)
    s[:, 0] = torch.tensor([4.0, 1.0, 3.0, 2.0])
    s[:, 1:4] = torch.tensor([0.1, 0.01, 0.001])
    for solver in ("greedy", "lagrangian"):
        p = problem({"x": (10, s)}, 1.0, max_pruned_fraction=1.0, solver=solver)
        assert solve(p).bits.tolist() == [2, 0, 2, 0], solver
    # measured-like tables: every pruned row costs no more per saved weight-bit than any row left at 2 bits
    tables = random_tables(n_layers=4)
    p = problem(tables, 1.5, max_pruned_fraction=1.0)
    bits = greedy_allocate(p).bits
    rho = (p.s[:, 0] - p.s[:, 1]) / (2 * p.fan)
    assert (bits == 0).sum() > 10 and (bits == 2).sum() > 10 and set(bits.unique().tolist()) == {0, 2}
    assert rho[bits == 0].max() <= rho[bits == 2].min()
    # with the per-layer cap, inside each layer the pruned rows are still that layer's least sensitive ones
    p = problem(tables, 1.2, max_pruned_fraction=0.5)
    bits = greedy_allocate(p).bits
    for li in range(len(p.layers)):
        mine = p.layer_of == li
        pruned, kept = mine & (bits == 0), mine & (bits == 2)
        assert pruned.any() and kept.any()
        assert rho[pruned].max() <= rho[kept].min(), p.layers[li].name


def test_impossible_budgets_name_the_minimum():
    tables = random_tables(n_layers=3)
    with pytest.raises(BudgetError, match=r"lowest reachable average is 2\.0000"):
        greedy_allocate(problem(tables, 1.9, bits=(2, 4, 8, 16)))
    with pytest.raises(BudgetError, match=r"lowest reachable average is 1\.0"):
        lagrangian_allocate(problem(tables, 0.5, max_pruned_fraction=0.5))
    for bad in (0, -1, float("nan"), float("inf"), "4"):
        with pytest.raises(BudgetError, match="budget must be"):
            problem(tables, bad)
    with pytest.raises(ValueError, match=r"no sensitivity for candidate bit-widths \[3\]|not in"):
        AllocationProblem.from_tables(tables, (0, 2, 4, 8, 16), 4, AllocationConfig(bits=(3, 16)))
    s = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no sensitivity for candidate bit-widths \[0, 2\]"):
        AllocationProblem.from_tables({"x": (8, s)}, (4, 8, 16), 4, AllocationConfig())


def test_lagrangian_is_optimal_on_a_problem_small_enough_to_enumerate():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, 5, generator=g, dtype=torch.float64) * torch.tensor([8.0, 4.0, 1.0, 0.1, 0.0])
    items = [(LayerMeta("x", out_features=3, fan_in=4), s[:3]), (LayerMeta("y", out_features=3, fan_in=8), s[3:])]
    for budget in (3.0, 5.0, 9.0):
        p = AllocationProblem.from_tables(items, BITS, budget, AllocationConfig(max_pruned_fraction=1.0))
        best = math.inf
        for combo in itertools.product(range(5), repeat=6):
            bits = torch.tensor([BITS[c] for c in combo])
            if p.total_bits(bits) <= p.limit:
                best = min(best, p.error(bits))
        lag = lagrangian_allocate(p)
        assert p.total_bits(lag.bits) <= p.limit
        assert lag.info["lower_bound"] <= best + 1e-12  # the dual value bounds the optimum from below
        assert p.error(lag.bits) >= best - 1e-12
        assert p.error(greedy_allocate(p).bits) >= best - 1e-12


def test_greedy_and_lagrangian_gaps_to_the_lower_bound():
    """Measured on 3 seeds x 6 budgets of `random_tables` (12 layers, ~1,300 channels): the Lagrangian solution is
    within 1% of the dual lower bound (worst seen 0.5%); the paper's staged greedy is 0.1x to 11x above it (worst
    seen 11.0x, at budget 2, where its stages force every channel to 2 bits before any is pruned) and never better
    than the Lagrangian. The bounds asserted here are those numbers with margin."""
    worst_greedy, worst_lagrangian = 0.0, 0.0
    for seed in range(3):
        tables = random_tables(seed)
        for budget in (8, 6, 4, 3, 2.5, 2):
            greedy = solve(problem(tables, budget, solver="greedy")).info
            lagrangian = solve(problem(tables, budget, solver="lagrangian")).info
            assert greedy["average_bits"] <= budget and lagrangian["average_bits"] <= budget
            assert lagrangian["total_error"] <= greedy["total_error"] * (1 + 1e-9)
            worst_greedy = max(worst_greedy, greedy["relative_gap"])
            worst_lagrangian = max(worst_lagrangian, lagrangian["relative_gap"])
    assert worst_lagrangian < 0.01
    assert worst_greedy < 12.0


def test_allocation_config_validates_and_round_trips():
    config = AllocationConfig(bits=(2, 4, 8), solver="lagrangian", prune_threshold=1e-3, template=PlanTemplate())
    assert config.bits == (2, 4, 8, 16)
    assert AllocationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, match in [
        (dict(solver="ilp"), "solver"),
        (dict(max_pruned_fraction=2), "max_pruned_fraction"),
        (dict(activation_bits=4), "activation bits"),
        (dict(bits=(1,)), "not in"),
    ]:
        with pytest.raises(ValueError, match=match):
            AllocationConfig(**bad)


def test_plan_from_a_calibrated_tiny_pi0(tiny_sensitivity):
    sens, _ = tiny_sensitivity
    plan = allocate(sens, 4.0)
    assert plan.method == "qvla-greedy" and plan.average_bits() <= 4.0
    assert plan.average_bits() > 4.0 - plan.info["allocation"]["last_step_bits_per_weight"]
    assert set(plan.roles()) == {"vision", "language", "action"}  # projector and action head are not in the plan
    assert plan.model_fingerprint and plan.info["dead_layers"] == sens.dead_layers
    # provably dead rows go first: at budget 15 they are all that is demoted
    plan15 = allocate(sens, 15.0)
    dead_rows = sum(plan15.layers[n].out_features for n in sens.dead_layers)
    assert plan15.info["allocation"]["dead_rows_pruned"] == plan15.info["allocation"]["pruned_rows"] <= dead_rows
    # a fixed-bit rule puts a layer in the plan at those bits, inside the budget; its rows are not allocated
    name = "model.dit.layers.0.mlp.down_proj"
    fixed = allocate(sens, 4.0, AllocationConfig(template=PlanTemplate(names={name: 16})))
    assert fixed.layers[name].bits == [16] * fixed.layers[name].out_features and fixed.average_bits() <= 4.0
    skip = allocate(sens, 4.0, AllocationConfig(template=PlanTemplate(names={name: "skip"})))
    assert name not in skip.layers
    with pytest.raises(ValueError, match="was not calibrated"):
        allocate(sens, 4.0, AllocationConfig(template=PlanTemplate(roles={"projector": "auto"})))
    lag = allocate(sens, 4.0, AllocationConfig(solver="lagrangian"))
    assert lag.info["allocation"]["total_error"] <= plan.info["allocation"]["total_error"]
