"""Bit allocation under an average-bit budget (Eq. 7-8): the paper's greedy demotion and a Lagrangian solver.

Budget: average bits per WEIGHT over the layers in the plan (rule "auto" and fixed-bit layers; "skip" layers are
outside the plan and the budget, as in the paper, Sec. 4.1). A row of a layer with fan-in K at b bits counts
b * K bits over K weights, so wide rows weigh more than narrow ones (the paper's Eq. 7 averages over channels;
over weights is what memory follows). Per-row scale/zero overhead is not counted (the packed sizes are reported
separately).

Greedy demotion (`solver="greedy"`, the paper's Sec. 3.3.2): every channel starts at 16 bits; stages
16 -> 8 -> 4 -> 2 -> 0 (consecutive members of the candidate bit set, e.g. {2, 4, 8, 16} has no pruning stage);
within a stage the channels still at b_hi are demoted in ascending order of
    rho = (s^(b_lo) - s^(b_hi)) / ((b_hi - b_lo) * K)            (action error added per weight-bit saved)
ties broken by (layer name, row index), and the run stops right after the demotion that makes the budget hold.
Before the first stage, rows that are dead (s = 0 at every bit: their layer never reaches the action, or the row
is all zeros) are pruned first, in (layer name, row) order, under the same stopping rule: the paper's stage order
would otherwise keep provably useless rows at 8 bits whenever the budget is >= 2.

Guards on pruning (the 2 -> 0 stage; dead rows are exempt, being provably irrelevant to the action):
    max_pruned_fraction  at most floor(fraction * rows) rows of a layer are pruned;
    prune_threshold      a channel with s^(0) above it is never pruned (None: no threshold).

What "meets the budget" guarantees: the final average is <= the budget, and when any row was demoted, it is
above the budget minus that last row's step ((b_hi - b_lo) * K / total weights): the greedy stops at the first
demotion that reaches the budget, never later. A budget below the lowest average the bit set, the guards and
the fixed layers allow raises `BudgetError` naming that minimum.

Lagrangian (`solver="lagrangian"`): the multiple-choice knapsack min sum s_c(b_c) s.t. sum b_c K_c <= budget
relaxed with a multiplier lambda: each channel takes argmin_b s_c(b) + lambda * b * K_c (the per-layer prune cap is
solved exactly inside: the rows that gain most from pruning are pruned), lambda bisected to the smallest value
whose allocation fits, then the leftover bits go to the best error-per-bit upgrades that still fit. Its dual value
max_lambda L(lambda) is a lower bound on the optimum of Eq. 7, so every allocation reports its gap to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import BIT_CHOICES, KEEP_BITS, PRUNE_BITS, ActivationQuantConfig, QuantConfig
from qvla_quant.roles import PlanTemplate
from qvla_quant.sensitivity import Sensitivity

SOLVERS = ("greedy", "lagrangian")


class BudgetError(ValueError):
    """The budget cannot be met (the message names the lowest reachable average) or is not a valid number."""


@dataclass(frozen=True)
class AllocationConfig:
    """How bits are allocated (module docstring). Validated on construction; JSON round-trip with to/from_dict.

    bits: candidate bit-widths per channel (16 always included). {2, 4, 8, 16}: no pruning.
    solver: "greedy" (the paper) or "lagrangian".
    template: per-layer rules; None uses the one the sensitivity was calibrated with.
    """

    bits: tuple[int, ...] = BIT_CHOICES
    solver: str = "greedy"
    max_pruned_fraction: float = 0.5
    prune_threshold: float | None = None
    prune_dead: bool = True
    activation_bits: int = 16
    template: PlanTemplate | None = None

    def __post_init__(self):
        bits = tuple(sorted({int(b) for b in self.bits} | {KEEP_BITS}))
        bad = set(bits) - set(BIT_CHOICES)
        if bad:
            raise ValueError(f"AllocationConfig.bits: {sorted(bad)} not in {BIT_CHOICES}")
        object.__setattr__(self, "bits", bits)
        if self.solver not in SOLVERS:
            raise ValueError(f"AllocationConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if not 0.0 <= self.max_pruned_fraction <= 1.0:
            raise ValueError(f"AllocationConfig.max_pruned_fraction must be in [0, 1], got {self.max_pruned_fraction}")
        if self.prune_threshold is not None and not self.prune_threshold >= 0:
            raise ValueError(f"AllocationConfig.prune_threshold must be >= 0 or None, got {self.prune_threshold}")
        ActivationQuantConfig(self.activation_bits)  # validates 8 / 16
        if isinstance(self.template, dict):
            object.__setattr__(self, "template", PlanTemplate.from_dict(self.template))

    def to_dict(self) -> dict:
        return {
            "bits": list(self.bits),
            "solver": self.solver,
            "max_pruned_fraction": self.max_pruned_fraction,
            "prune_threshold": self.prune_threshold,
            "prune_dead": self.prune_dead,
            "activation_bits": self.activation_bits,
            "template": None if self.template is None else self.template.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> AllocationConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"AllocationConfig: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "bits" in d:
            d["bits"] = tuple(d["bits"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LayerMeta:
    name: str
    role: str = "other"
    kind: str = "linear"
    out_features: int = 0
    fan_in: int = 0


@dataclass
class AllocationProblem:
    """The flattened problem: C channels of the allocated layers, their sensitivities at the candidate bits
    (ascending), guards, fixed layers, and the budget as an integer number of bits."""

    layers: list[LayerMeta]
    bits: tuple[int, ...]
    s: torch.Tensor  # [C, nb] float64
    layer_of: torch.Tensor  # [C] int64 index into layers
    row: torch.Tensor  # [C] int64
    fan: torch.Tensor  # [C] int64
    dead: torch.Tensor  # [C] bool: pruned first, exempt from guards
    protected: torch.Tensor  # [C] bool: never pruned
    cap: torch.Tensor  # [L] int64: max pruned non-dead rows per layer
    fixed: dict[str, LayerPlan]
    budget: float
    limit: int  # floor(budget * n_weights): the most bits the plan may hold
    n_weights: int
    fixed_bits: int
    config: AllocationConfig = field(default_factory=AllocationConfig)

    @property
    def auto_limit(self) -> int:
        return self.limit - self.fixed_bits

    @classmethod
    def from_tables(
        cls,
        tables: dict[str, tuple[int, torch.Tensor]] | list[tuple[LayerMeta, torch.Tensor]],
        bits: tuple[int, ...],
        budget: float,
        config: AllocationConfig | None = None,
        *,
        fixed: dict[str, LayerPlan] | None = None,
        dead_layers: set[str] | frozenset = frozenset(),
    ) -> AllocationProblem:
        """tables: name -> (fan_in, s [out, len(bits)]) or [(LayerMeta, s)]; `bits` label the columns of s."""
        config = config or AllocationConfig()
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise BudgetError(f"budget must be a finite number of bits per weight, got {budget!r}")
        if budget <= 0:
            raise BudgetError(f"budget must be > 0 bits per weight, got {budget}")
        items = tables if isinstance(tables, list) else [
            (LayerMeta(name, out_features=s.shape[0], fan_in=int(k)), s) for name, (k, s) in tables.items()
        ]  # fmt: skip
        missing = [b for b in config.bits if b not in bits]
        if missing:
            raise ValueError(
                f"no sensitivity for candidate bit-widths {missing} (measured: {list(bits)}); calibrate with them "
                "or drop them from the allocation bits"
            )
        cols = [list(bits).index(b) for b in config.bits]
        layers, s_parts, layer_of, rows, fans, dead_rows, caps = [], [], [], [], [], [], []
        for li, (meta, s) in enumerate(items):
            s = torch.as_tensor(s, dtype=torch.float64)
            if s.dim() != 2 or s.shape[0] != meta.out_features or s.shape[1] != len(bits):
                raise ValueError(
                    f"{meta.name}: sensitivity shape {tuple(s.shape)}, expected ({meta.out_features}, {len(bits)})"
                )
            if not torch.isfinite(s).all():
                raise ValueError(f"{meta.name}: sensitivities must be finite")
            s = s[:, cols]
            layers.append(meta)
            s_parts.append(s)
            n = meta.out_features
            layer_of.append(torch.full((n,), li, dtype=torch.int64))
            rows.append(torch.arange(n))
            fans.append(torch.full((n,), meta.fan_in, dtype=torch.int64))
            is_dead = (s == 0).all(dim=1) | (meta.name in dead_layers)
            dead_rows.append(is_dead if config.prune_dead else torch.zeros(n, dtype=torch.bool))
            caps.append(math.floor(config.max_pruned_fraction * n + 1e-9))
        s = torch.cat(s_parts) if s_parts else torch.zeros(0, len(config.bits), dtype=torch.float64)
        dead = torch.cat(dead_rows) if dead_rows else torch.zeros(0, dtype=torch.bool)
        protected = torch.zeros(len(s), dtype=torch.bool)
        if config.prune_threshold is not None and PRUNE_BITS in config.bits:
            protected = (s[:, config.bits.index(PRUNE_BITS)] > config.prune_threshold) & ~dead
        fixed = dict(fixed or {})
        n_weights = sum(m.out_features * m.fan_in for m in layers) + sum(lp.n_weights for lp in fixed.values())
        if n_weights == 0:
            raise ValueError("nothing to allocate: no layer with rule 'auto' or a fixed bit-width")
        limit = math.floor(Fraction(repr(float(budget))) * n_weights)
        return cls(
            layers=layers,
            bits=config.bits,
            s=s,
            layer_of=torch.cat(layer_of) if layer_of else torch.zeros(0, dtype=torch.int64),
            row=torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64),
            fan=torch.cat(fans) if fans else torch.zeros(0, dtype=torch.int64),
            dead=dead,
            protected=protected,
            cap=torch.tensor(caps, dtype=torch.int64),
            fixed=fixed,
            budget=float(budget),
            limit=limit,
            n_weights=n_weights,
            fixed_bits=sum(lp.total_bits for lp in fixed.values()),
            config=config,
        )

    @classmethod
    def from_sensitivity(cls, sens: Sensitivity, budget: float, config: AllocationConfig) -> AllocationProblem:
        template = config.template or PlanTemplate.from_dict(sens.config.get("template", {}))
        items, fixed = [], {}
        metas = {
            name: LayerMeta(name, l.role, l.kind, l.out_features, l.fan_in) for name, l in sens.layers.items()
        }  # fmt: skip
        for name, d in sens.other_layers.items():
            metas.setdefault(name, LayerMeta(name, d["role"], d["kind"], d["out_features"], d["fan_in"]))
        for name, meta in metas.items():
            rule = template.rule_for(name, meta.role)
            if rule == "skip":
                continue
            if rule == "auto":
                if name not in sens.layers:
                    raise ValueError(
                        f"{name}: the template allocates it ('auto') but it was not calibrated; calibrate with a "
                        "template that includes it"
                    )
                items.append((meta, sens.values(name)))
            else:
                fixed[name] = LayerPlan(
                    name, meta.role, meta.kind, meta.out_features, meta.fan_in, [rule] * meta.out_features
                )
        return cls.from_tables(items, sens.bits, budget, config, fixed=fixed, dead_layers=set(sens.dead_layers))

    # ---- helpers
    def total_bits(self, bits: torch.Tensor) -> int:
        return int((bits.long() * self.fan).sum()) + self.fixed_bits

    def error(self, bits: torch.Tensor) -> float:
        """Total sensitivity of an allocation (the objective of Eq. 7)."""
        column_of = torch.zeros(KEEP_BITS + 1, dtype=torch.int64)
        column_of[torch.tensor(self.bits)] = torch.arange(len(self.bits))
        cols = column_of[bits.long()]
        return float(self.s.gather(1, cols[:, None]).sum()) if len(cols) else 0.0

    def lowest_bits(self) -> torch.Tensor:
        """Every channel at the lowest bit-width the bit set and the guards allow."""
        lowest = torch.full((len(self.s),), self.bits[0], dtype=torch.int64)
        if self.bits[0] != PRUNE_BITS:
            return lowest
        next_bits = self.bits[1]
        prunable = ~self.dead & ~self.protected
        lowest[~self.dead & self.protected] = next_bits
        for li in range(len(self.layers)):
            idx = (prunable & (self.layer_of == li)).nonzero().squeeze(1)
            lowest[idx[int(self.cap[li]) :]] = next_bits  # rows are interchangeable for the total (one fan-in)
        return lowest

    def check_reachable(self) -> None:
        lowest = self.lowest_bits()
        minimum = self.total_bits(lowest)
        if minimum > self.limit:
            c = self.config
            raise BudgetError(
                f"budget {self.budget:g} bits/weight cannot be met: the lowest reachable average is "
                f"{minimum / self.n_weights:.4f} (candidate bits {list(c.bits)}, max pruned fraction "
                f"{c.max_pruned_fraction:g}, prune threshold {c.prune_threshold}, "
                f"{len(self.fixed)} fixed-bit layer(s) holding {self.fixed_bits / self.n_weights:.4f} bits/weight); "
                "raise the budget or relax these"
            )


def _name_rank(problem: AllocationProblem) -> torch.Tensor:
    order = sorted(range(len(problem.layers)), key=lambda i: problem.layers[i].name)
    rank = torch.empty(len(order), dtype=torch.int64)
    rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    return rank[problem.layer_of] if len(problem.layer_of) else problem.layer_of


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by keys[0], then keys[1], ... (numpy.lexsort takes the primary key last)."""
    return torch.from_numpy(np.lexsort([k.numpy() for k in reversed(keys)]).copy())


def _rank_within(groups: torch.Tensor) -> torch.Tensor:
    """For a sequence of group ids in processing order: how many earlier items share the group."""
    if len(groups) == 0:
        return groups.clone()
    order = torch.sort(groups, stable=True).indices  # positions grouped, processing order kept inside a group
    sorted_groups = groups[order]
    starts = torch.ones(len(groups), dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = torch.arange(len(groups))[starts][torch.cumsum(starts.long(), 0) - 1]
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(len(groups)) - first
    return rank


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AllocationResult:
    bits: torch.Tensor  # [C] chosen bits
    info: dict


def greedy_allocate(problem: AllocationProblem) -> AllocationResult:
    """The paper's staged greedy demotion (module docstring)."""
    problem.check_reachable()
    bits = torch.full((len(problem.s),), KEEP_BITS, dtype=torch.int64)
    total = problem.total_bits(bits)
    name_rank = _name_rank(problem)
    col = {b: i for i, b in enumerate(problem.bits)}
    last_step = 0
    demotions = 0
    stage_log = []

    def demote(order: torch.Tensor, lo: int, savings: torch.Tensor) -> bool:
        """Demote `order` to `lo` one by one until the budget holds; True when it does."""
        nonlocal total, last_step, demotions
        if len(order) == 0:
            return total <= problem.limit
        cum = savings.cumsum(0)
        need = total - problem.limit
        hit = (cum >= need).nonzero()
        stop = int(hit[0]) + 1 if len(hit) else len(order)
        bits[order[:stop]] = lo
        total -= int(cum[stop - 1])
        last_step = int(savings[stop - 1])
        demotions += stop
        return total <= problem.limit

    done = total <= problem.limit
    if not done and PRUNE_BITS in problem.bits:
        dead_idx = problem.dead.nonzero().squeeze(1)
        order = dead_idx[_lexsort(name_rank[dead_idx], problem.row[dead_idx])]
        done = demote(order, PRUNE_BITS, (KEEP_BITS - PRUNE_BITS) * problem.fan[order])
        stage_log.append({"stage": "dead->0", "demoted": int((bits[dead_idx] == PRUNE_BITS).sum())})
    desc = sorted(problem.bits, reverse=True)
    for hi, lo in zip(desc, desc[1:]):
        if done:
            break
        cand = bits == hi
        if lo == PRUNE_BITS:
            cand &= ~problem.protected
        idx = cand.nonzero().squeeze(1)
        rho = (problem.s[idx, col[lo]] - problem.s[idx, col[hi]]) / ((hi - lo) * problem.fan[idx]).double()
        order = idx[_lexsort(rho, name_rank[idx], problem.row[idx])]
        if lo == PRUNE_BITS:
            # dead rows were all pruned before the stages, so every candidate here counts against its layer's cap
            rank = _rank_within(problem.layer_of[order])
            order = order[rank < problem.cap[problem.layer_of[order]]]
        before = int((bits == lo).sum())
        done = demote(order, lo, (hi - lo) * problem.fan[order])
        stage_log.append({"stage": f"{hi}->{lo}", "demoted": int((bits == lo).sum()) - before})
    if not done:  # unreachable after check_reachable; kept as a guard against a logic error
        raise BudgetError(f"greedy demotion could not reach {problem.budget:g} bits/weight")
    return AllocationResult(
        bits,
        {
            "solver": "greedy",
            "demotions": demotions,
            "last_step_bits_per_weight": last_step / problem.n_weights,
            "stages": stage_log,
        },
    )


# ---------------------------------------------------------------------------------------------------------------
def _lagrangian_choice(problem: AllocationProblem, lam: float) -> tuple[torch.Tensor, float]:
    """Column index per channel minimizing s + lam * b * K (prune cap solved exactly), and sum of those costs."""
    bits_t = torch.tensor(problem.bits, dtype=torch.float64)
    cost = problem.s + lam * bits_t[None, :] * problem.fan[:, None].double()
    if problem.bits[0] == PRUNE_BITS:
        cost[problem.protected, 0] = math.inf
    # ties go to the higher bit-width: scan columns from the top
    choice = (cost.shape[1] - 1) - torch.argmin(cost.flip(1).contiguous(), dim=1)
    if problem.bits[0] == PRUNE_BITS and len(problem.s):
        pruned = ((choice == 0) & ~problem.dead).nonzero().squeeze(1)
        if len(pruned):
            best_nz_cost, best_nz = cost[pruned, 1:].flip(1).contiguous().min(dim=1)
            best_nz = (cost.shape[1] - 1) - best_nz  # index in the full table (flipped, offset by column 0)
            benefit = best_nz_cost - cost[pruned, 0]
            order = _lexsort(problem.layer_of[pruned], -benefit, problem.row[pruned])
            rank = _rank_within(problem.layer_of[pruned][order])
            over = rank >= problem.cap[problem.layer_of[pruned][order]]
            choice[pruned[order[over]]] = best_nz[order[over]]
    chosen = cost.gather(1, choice[:, None]).squeeze(1)
    return choice, float(chosen.sum())


def dual_bound(problem: AllocationProblem, lam: float) -> float:
    """L(lambda) = sum_c min_b [s_c(b) + lambda b K_c] - lambda * (bits available to the allocated layers);
    a lower bound on the optimal total error of Eq. 7 for every lambda >= 0."""
    _, value = _lagrangian_choice(problem, lam)
    return value - lam * problem.auto_limit


def lagrangian_allocate(problem: AllocationProblem, iterations: int = 100) -> AllocationResult:
    problem.check_reachable()
    bits_t = torch.tensor(problem.bits, dtype=torch.int64)

    def total(choice):
        return problem.total_bits(bits_t[choice])

    choice0, _ = _lagrangian_choice(problem, 0.0)
    if total(choice0) <= problem.limit:
        lam_lo = lam_hi = 0.0
        choice_lo = choice_hi = choice0
    else:
        # above lam_max every saved weight-bit is worth more than any channel's whole error: lowest bits everywhere
        span = float(problem.s.max() - problem.s.min()) if len(problem.s) else 0.0
        lam_hi = 2.0 * (span + 1e-30) / (max(1, int(problem.fan.min())) * min(np.diff(problem.bits)))
        choice_hi, _ = _lagrangian_choice(problem, lam_hi)
        while total(choice_hi) > problem.limit:  # the cap's tie-breaking can need a little more
            lam_hi *= 2
            choice_hi, _ = _lagrangian_choice(problem, lam_hi)
        lam_lo, choice_lo = 0.0, choice0
        for _ in range(iterations):
            # geometric steps while lam_lo is 0 cover many orders of magnitude, then plain bisection
            mid = lam_hi * 1e-6 if lam_lo == 0.0 and lam_hi > 1e-300 else 0.5 * (lam_lo + lam_hi)
            c, _ = _lagrangian_choice(problem, mid)
            if total(c) <= problem.limit:
                lam_hi, choice_hi = mid, c
            else:
                lam_lo, choice_lo = mid, c
            if lam_hi - lam_lo <= 1e-9 * lam_hi:
                break
    lower = max(dual_bound(problem, lam_lo), dual_bound(problem, lam_hi))
    # fill the leftover budget: upgrade the channels that lam_lo would give more bits, best error-per-bit first
    choice = choice_hi.clone()
    spare = problem.limit - total(choice)
    up = (choice_lo > choice).nonzero().squeeze(1)
    if len(up) and spare > 0:
        d_bits = (bits_t[choice_lo[up]] - bits_t[choice[up]]) * problem.fan[up]
        d_err = problem.s[up, choice[up]] - problem.s[up, choice_lo[up]]
        order = _lexsort(-(d_err / d_bits.double()), _name_rank(problem)[up], problem.row[up])
        for i in order.tolist():
            if int(d_bits[i]) <= spare:
                choice[up[i]] = choice_lo[up[i]]
                spare -= int(d_bits[i])
    info = {"solver": "lagrangian", "lambda": lam_hi, "lower_bound": lower}
    info["unused_bits_per_weight"] = spare / problem.n_weights
    return AllocationResult(bits_t[choice], info)


def solve(problem: AllocationProblem) -> AllocationResult:
    result = greedy_allocate(problem) if problem.config.solver == "greedy" else lagrangian_allocate(problem)
    error = problem.error(result.bits)
    if "lower_bound" not in result.info:
        # the dual value at the lambda that fits the budget bounds the optimum from below
        result.info["lower_bound"] = lagrangian_allocate(problem).info["lower_bound"]
    lower = result.info["lower_bound"]
    result.info.update(
        total_error=error,
        relative_gap=(error - lower) / lower if lower > 0 else (0.0 if error == 0 else math.inf),
        average_bits=problem.total_bits(result.bits) / problem.n_weights,
        budget=problem.budget,
        minimum_average_bits=problem.total_bits(problem.lowest_bits()) / problem.n_weights,
        pruned_rows=int((result.bits == PRUNE_BITS).sum()),
        dead_rows_pruned=int(((result.bits == PRUNE_BITS) & problem.dead).sum()),
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
def allocate_plan(sens: Sensitivity, budget: float, config: AllocationConfig | None = None) -> Plan:
    """Allocate bits from sensitivities under `budget` (average bits per weight) and emit the Plan."""
    from qvla_quant.artifact import fingerprint_id
    from qvla_quant.quantizer import WeightQuantConfig

    config = config or AllocationConfig()
    problem = AllocationProblem.from_sensitivity(sens, budget, config)
    result = solve(problem)
    layers: dict[str, LayerPlan] = {}
    for li, meta in enumerate(problem.layers):
        rows = (problem.layer_of == li).nonzero().squeeze(1)
        layers[meta.name] = LayerPlan(
            meta.name, meta.role, meta.kind, meta.out_features, meta.fan_in, result.bits[rows].tolist()
        )
    layers.update(problem.fixed)
    weight = WeightQuantConfig.from_dict(sens.config["weight"]) if "weight" in sens.config else WeightQuantConfig()
    info = {
        "allocation": {**result.info, "config": config.to_dict()},
        "dead_layers": list(sens.dead_layers),
        "sensitivity": {k: sens.report.get(k) for k in ("method", "proxy", "probes", "rank_correlation", "n_samples")},
        "adapter": (sens.adapter_config or {}).get("adapter"),
    }
    return Plan(
        layers=layers,
        quant=QuantConfig(weight=weight, activation=ActivationQuantConfig(config.activation_bits)),
        budget=float(budget),
        model_fingerprint=fingerprint_id(sens.fingerprint) if sens.fingerprint.get("structure") else "",
        method=f"qvla-{config.solver}",
        info=_jsonable(info),
    )


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x
