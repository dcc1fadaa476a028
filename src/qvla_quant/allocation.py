"""Bit allocation under an average-bit budget (Eq. 7-8): the paper's greedy demotion and an optimal solver.

Budget: average bits per WEIGHT over the layers in the plan (rule "auto" and fixed-bit layers; "skip" layers are
outside the plan and the budget, as in the paper, Sec. 4.1). A row of a layer with fan-in K at b bits counts
b * K bits over K weights, so wide rows weigh more than narrow ones (the paper's Eq. 7 averages over channels;
over weights is what memory follows). Per-row scale/zero overhead is not counted (the packed sizes are reported
separately). Eq. 7 is then a multiple-choice knapsack: each channel c picks one width b (cost b * K_c bits, error
s_c(b)), total cost <= floor(budget * weights), minimum total error.

Grouped choices: when the sensitivity has grouped columns (`CalibrationConfig.group_size` g) and
`AllocationConfig.groups` allows them, a row at a candidate width b in GROUPED_BITS may also take "bg" (group-wise
scales), at its plan cost b * K + 40 * (ceil(K / g) - 1) (`quantizer.row_choice_costs`: the extra fp32 scales and
uint8 zero points are in the budget, so budgets stay exact in `Plan.average_bits`). The choices of every row are
then the columns in ascending cost (0, 2, 2g, 4, 4g, 8, 16: with g >= 64 a grouped variant costs less than one more
bit), their costs no longer proportional to the bits. A layer whose rows fit in one group (K <= g) has no grouped
choice (it would be the per-row row under another name). Without grouped columns every number below is what it was.

Greedy demotion (`solver="greedy"`, the paper's Sec. 3.3.2): every channel starts at 16 bits; stages
16 -> 8 -> 4 -> 2 -> 0 (consecutive members of the candidate bit set, e.g. {2, 4, 8, 16} has no pruning stage);
within a stage the channels still at b_hi are demoted in ascending order of
    rho = (s^(b_lo) - s^(b_hi)) / ((b_hi - b_lo) * K)            (action error added per weight-bit saved)
ties broken by (layer name, row index), and the run stops right after the demotion that makes the budget hold.
With grouped choices the stages run over the choices in descending cost, 16 -> 8 -> 4g -> 4 -> 2g -> 2 -> 0,
rho being the error added per plan bit saved (cost(hi) - cost(lo) in the denominator); a row without the grouped
choice (K <= g) goes straight to the next per-row width in that stage.
Before the first stage, rows that are dead (s = 0 at every bit: their layer never reaches the action, or the row
is all zeros) are pruned first, in (layer name, row) order, under the same stopping rule: the paper's stage order
would otherwise keep provably useless rows at 8 bits whenever the budget is >= 2.

Guards on pruning (the 2 -> 0 stage, regularized as in the paper with a dual threshold and an L0-style count;
dead rows are exempt, being provably irrelevant to the action). A row may be pruned only if
    s^(0) <= prune_abs_threshold                                  (absolute; None: no limit), and
    s^(0) <= prune_rel_threshold * median of s^(0) over its layer's non-dead rows   (relative; None: no limit),
and at most floor(max_pruned_fraction * rows) rows of a layer are pruned (the L0 count). A row either threshold
protects has no 0-bit choice, in both solvers. (`prune_threshold` is the former name of the absolute one.)

What "meets the budget" guarantees: the final average is <= the budget, and, for the greedy, when any row was
demoted, it is above the budget minus that last row's step ((b_hi - b_lo) * K / total weights): the greedy stops
at the first demotion that reaches the budget, never later. A budget below the lowest average the bit set, the
guards and the fixed layers allow raises `BudgetError` naming that minimum.

Optimal (`solver="lagrangian"`, the name kept from the Lagrangian heuristic it replaces, so that configs, plans
("qvla-lagrangian") and CLI choices keep working and mean "the best allocation"), in three steps. Below, b K_c is
the cost of choice b of channel c; with grouped choices it is that choice's plan cost c_c(b) (b K_c plus its extra
scales and zero points): nothing in the three steps or their bounds needs costs proportional to the bits (weak
duality holds for any costs, the relaxed minimizer's cost falls with lambda for any costs, and the reduced-cost
identity is an identity), only integer costs ascending with the column (ties to the cheaper choice).
1. Lagrangian relaxation of the budget with a multiplier lambda >= 0 (the caps kept): each channel takes argmin_b
   s_c(b) + lambda b K_c (ties to fewer bits), a vertex of the lower convex hull of its (cost, error) points; in a
   layer whose cap binds, the rows that gain most from pruning keep 0 bits and the others take their best non-zero
   width (exact for that layer). With B the bits available to the allocated layers (rounded down to a multiple of
   gcd(bits) * gcd(fan-ins), which every allocation's cost is; with grouped choices, of the gcd of every choice's
   cost in every layer), its value
       L(lambda) = sum_c min_b [s_c(b) + lambda b K_c] - lambda * B
   is a lower bound on the optimum for every lambda, and the smallest lambda whose choice meets the budget
   maximizes it (the LP relaxation: every channel at a hull vertex but one fractional channel). It is found by
   bisection on the doubles from a bracket that a strided sample of 65,536 channels suggests; each step visits only
   the channels whose choice can still change in the bracket (without a cap, those whose width differs between
   its ends; in a capped layer, the rows near the cap's margin), so that 10 M channels take a few full passes.
2. Primal repair: from the choice at that lambda (which meets the budget), the leftover bits go to the upgrades
   with the most error saved per bit, each taken if it still fits, until none does.
3. Exact repair of the last items: with mu_l the cap's multiplier (the gain of the best row it turns away), every
   choice has a reduced cost rc = s + lambda b K + mu_l [b = 0] - (its channel's minimum) >= 0, and for every
   allocation x within budget and caps
       sum_c s_c(x_c) = L + sum_c rc_c(x_c) + lambda * (unused bits) + sum_l mu_l * (unused prunes of layer l),
   so an allocation better than the incumbent uses only choices with rc < incumbent - L: every other channel is
   fixed. A dynamic program over the Pareto-optimal partial allocations of the open channels (cost, error, pruned
   rows where the core could break a cap), layer by layer, cut where the identity's terms reach the same gap,
   finds the optimum.
The result is proven optimal (to 1e-12 relative) unless the open core exceeds `max_core` channels or the program
`max_states` states; info reports which (proven_optimal), the dual bound L, and lower_bound (the optimum when
proven, else L), so its gap to the lower bound is 0 or what is known. The greedy's info reports its gap to the
same lower bound. Measured: the optimum on every one of 240 brute-forced six-channel instances and on HiGHS's
~650-channel ones (tests); 10 M channels x 5 choices in 4-6 CPU-seconds here, proven optimal (bench_quant.py
--alloc-only).
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from qvla_quant.config import ActivationQuantConfig, AllocationConfig, QuantConfig, WeightQuantConfig
from qvla_quant.fingerprint import fingerprint_id
from qvla_quant.layers import LayerDesc
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import KEEP_BITS, PRUNE_BITS, RowChoice, row_choice_costs
from qvla_quant.roles import PlanTemplate
from qvla_quant.sensitivity_store import Sensitivity


class BudgetError(ValueError):
    """The budget cannot be met (the message names the lowest reachable average) or is not a valid number."""


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AllocationProblem:
    """The flattened problem: C channels of the allocated layers, their sensitivities at the candidate bits
    (ascending), guards, fixed layers, and the budget as an integer number of bits.

    With grouped choices (module docstring), the columns of s are `choices` in ascending cost, `bits` their widths
    (a width appears twice, per-row and grouped), `group_size` g and `overhead` [C] the extra plan bits of a grouped
    row, 40 * (ceil(K/g) - 1) (0: the layer's rows fit in one group, its grouped columns are not allowed). Without,
    choices are the per-row `bits` and overhead is None."""

    layers: list[LayerDesc]
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
    choices: tuple[RowChoice, ...] = ()
    group_size: int | None = None
    overhead: torch.Tensor | None = None  # [C] int64

    def __post_init__(self):
        if not self.choices:
            self.choices = tuple(RowChoice(b) for b in self.bits)
        self.column_bits = torch.tensor(self.bits, dtype=torch.int64)
        self.column_grouped = torch.tensor([c.grouped for c in self.choices], dtype=torch.bool)

    @property
    def auto_limit(self) -> int:
        return self.limit - self.fixed_bits

    @property
    def has_groups(self) -> bool:
        return self.overhead is not None

    @classmethod
    def from_tables(
        cls,
        tables: dict[str, tuple[int, torch.Tensor]] | list[tuple[LayerDesc, torch.Tensor]],
        bits: tuple[int, ...],
        budget: float,
        config: AllocationConfig | None = None,
        *,
        fixed: dict[str, LayerPlan] | None = None,
        dead_layers: set[str] | frozenset = frozenset(),
        group_size: int | None = None,
    ) -> AllocationProblem:
        """tables: name -> (fan_in, s [out, len(bits)]) or [(LayerDesc, s)]; `bits` label the columns of s: bit-widths
        (per-row), or row choices (RowChoice or labels such as "4g": grouped columns need the `group_size` they
        were measured with). The candidates are the per-row `config.bits` and, when `config.groups`, the grouped
        columns of those widths."""
        config = config or AllocationConfig()
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise BudgetError(f"budget must be a finite number of bits per weight, got {budget!r}")
        if budget <= 0:
            raise BudgetError(f"budget must be > 0 bits per weight, got {budget}")
        items = tables if isinstance(tables, list) else [
            (LayerDesc(name, "other", "linear", s.shape[0], int(k)), s) for name, (k, s) in tables.items()
        ]  # fmt: skip
        columns = [b if isinstance(b, RowChoice) else RowChoice.parse(b) for b in bits]
        if len(set(columns)) != len(columns):
            raise ValueError(f"sensitivity columns {[c.label for c in columns]} name a row choice twice")
        if any(c.grouped for c in columns) and group_size is None:
            raise ValueError(
                f"sensitivity columns {[c.label for c in columns if c.grouped]} are grouped: give the group_size "
                "they were calibrated with"
            )
        missing = [b for b in config.bits if RowChoice(b) not in columns]
        if missing:
            measured = [c.bits for c in columns] if not any(c.grouped for c in columns) else [c.label for c in columns]
            raise ValueError(
                f"no sensitivity for candidate bit-widths {missing} (measured: {measured}); calibrate with them "
                "or drop them from the allocation bits"
            )
        choices = [RowChoice(b) for b in config.bits]
        if config.groups:
            choices += [c for c in columns if c.grouped and c.bits in config.bits]
        choices = sorted(choices)  # ascending cost (the quantizer's order)
        if not any(c.grouped for c in choices):
            group_size = None
        cols = [columns.index(c) for c in choices]
        layers, s_parts = [], []
        for meta, s in items:
            s = torch.as_tensor(s, dtype=torch.float64)
            if s.dim() != 2 or s.shape[0] != meta.out_features or s.shape[1] != len(bits):
                raise ValueError(
                    f"{meta.name}: sensitivity shape {tuple(s.shape)}, expected ({meta.out_features}, {len(bits)})"
                )
            layers.append(meta)
            s_parts.append(s)
        s = torch.cat(s_parts) if s_parts else torch.zeros(0, len(bits), dtype=torch.float64)
        sizes = torch.tensor([m.out_features for m in layers], dtype=torch.int64)
        starts = torch.cumsum(sizes, 0) - sizes
        del s_parts
        if cols != list(range(len(bits))):
            s = s[:, cols].contiguous()  # the candidates only: another column may be anything
        if not bool(torch.isfinite(s).all()):
            first = int((~torch.isfinite(s)).any(1).nonzero()[0])
            bad = layers[int(torch.searchsorted(starts + sizes, first, right=True))].name
            raise ValueError(f"{bad}: sensitivities must be finite")
        layer_of = torch.repeat_interleave(torch.arange(len(layers)), sizes)
        row = torch.arange(len(s)) - starts[layer_of]
        fan = torch.tensor([m.fan_in for m in layers], dtype=torch.int64)[layer_of]
        dead = torch.zeros(len(s), dtype=torch.bool)
        if config.prune_dead:
            dead = (s == 0).all(dim=1)
            dead_layer = torch.tensor([m.name in dead_layers for m in layers], dtype=torch.bool)
            dead |= dead_layer[layer_of]
        protected = torch.zeros(len(s), dtype=torch.bool)
        if config.prune_abs_threshold is not None or config.prune_rel_threshold is not None:
            for a, n in zip(starts.tolist(), sizes.tolist()):
                protected[a : a + n] = _guarded(s[a : a + n], dead[a : a + n], config)
        overhead = None
        if group_size is not None:
            overhead = _layer_overheads(layers, choices, group_size)[layer_of]
        caps = [math.floor(config.max_pruned_fraction * m.out_features + 1e-9) for m in layers]
        fixed = dict(fixed or {})
        n_weights = sum(m.out_features * m.fan_in for m in layers) + sum(lp.n_weights for lp in fixed.values())
        if n_weights == 0:
            raise ValueError("nothing to allocate: no layer with rule 'auto' or a fixed bit-width")
        limit = math.floor(Fraction(repr(float(budget))) * n_weights)
        return cls(
            layers=layers,
            bits=tuple(c.bits for c in choices),
            s=s,
            layer_of=layer_of,
            row=row,
            fan=fan,
            dead=dead,
            protected=protected,
            cap=torch.tensor(caps, dtype=torch.int64),
            fixed=fixed,
            budget=float(budget),
            limit=limit,
            n_weights=n_weights,
            fixed_bits=sum(lp.total_bits for lp in fixed.values()),
            config=config,
            choices=tuple(choices),
            group_size=group_size,
            overhead=overhead,
        )

    @classmethod
    def from_sensitivity(cls, sens: Sensitivity, budget: float, config: AllocationConfig) -> AllocationProblem:
        template = config.template or PlanTemplate.from_dict(sens.config.get("template", {}))
        items, fixed = [], {}
        metas = {
            name: layer.desc() for name, layer in sens.layers.items()
        }  # fmt: skip
        for name, d in sens.other_layers.items():
            metas.setdefault(name, LayerDesc.from_dict(name, d))
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
        return cls.from_tables(
            items, sens.choices, budget, config, fixed=fixed, dead_layers=set(sens.dead_layers),
            group_size=sens.group_size,
        )  # fmt: skip

    # ---- costs of the choices (column j of channel c: bits_j K_c, plus overhead_c when j is grouped)
    def cost_matrix(self, rows=slice(None)) -> torch.Tensor:
        """Plan bits of every choice of the channels `rows` (a slice or an index tensor): [n, nb] int64."""
        cost = self.column_bits[None, :] * self.fan[rows, None]
        if self.overhead is not None:
            cost = cost + self.column_grouped.long()[None, :] * self.overhead[rows, None]
        return cost

    def cost_at(self, col, rows=slice(None)) -> torch.Tensor:
        """Plan bits of the channels `rows` at column(s) `col` (an int, or one column per row): [n] int64."""
        col = torch.as_tensor(col, dtype=torch.int64)
        cost = self.column_bits[col] * self.fan[rows]
        if self.overhead is not None:
            cost = cost + self.column_grouped.long()[col] * self.overhead[rows]
        return cost

    def forbidden(self, rows=slice(None)) -> torch.Tensor | None:
        """The choices the channels `rows` may not take as far as groups go ([n, nb] bool; None: none): a layer
        whose rows fit in one group has no grouped choice. (Pruning guards are separate: `protected`, the caps.)"""
        if self.overhead is None:
            return None
        return self.column_grouped[None, :] & (self.overhead[rows] == 0)[:, None]

    def columns_of(self, bits: torch.Tensor, grouped: torch.Tensor | None = None) -> torch.Tensor:
        """The column of each channel's (bits, grouped) choice; ValueError for a choice that is not a column."""
        column_of = torch.full((KEEP_BITS + 1, 2), -1, dtype=torch.int64)
        for j, c in enumerate(self.choices):
            column_of[c.bits, int(c.grouped)] = j
        g = torch.zeros_like(bits, dtype=torch.long) if grouped is None else grouped.long()
        cols = column_of[bits.long(), g]
        if bool((cols < 0).any()):
            i = int((cols < 0).nonzero()[0])
            label = RowChoice(int(bits[i]), bool(g[i])).label
            labels = [c.label for c in self.choices]
            raise ValueError(f"channel {i}: row choice {label!r} is not a candidate ({labels})")
        return cols

    # ---- helpers
    def total_bits(self, bits: torch.Tensor, grouped: torch.Tensor | None = None) -> int:
        """Plan bits of an allocation (per-channel bits and, with grouped choices, grouped flags), fixed layers
        included."""
        total = int((bits.long() * self.fan).sum()) + self.fixed_bits
        if grouped is not None and bool(grouped.any()):
            if self.overhead is None:
                raise ValueError("grouped rows in an allocation of a problem without grouped choices")
            total += int((grouped.long() * self.overhead).sum())
        return total

    def error(self, bits: torch.Tensor, grouped: torch.Tensor | None = None) -> float:
        """Total sensitivity of an allocation (the objective of Eq. 7)."""
        cols = self.columns_of(bits, grouped)
        return float(self.s.gather(1, cols[:, None]).sum()) if len(cols) else 0.0

    def lowest_bits(self) -> torch.Tensor:
        """Every channel at the lowest bit-width the bit set and the guards allow."""
        lowest = torch.full((len(self.s),), self.bits[0], dtype=torch.int64)
        if self.bits[0] != PRUNE_BITS:
            return lowest
        next_bits = self.bits[1]
        lowest[~self.dead & self.protected] = next_bits
        idx = (~self.dead & ~self.protected).nonzero().squeeze(1)
        # the first cap prunable rows of each layer stay pruned (rows are interchangeable for the total: one fan-in)
        over = _rank_within(self.layer_of[idx]) >= self.cap[self.layer_of[idx]]
        lowest[idx[over]] = next_bits
        return lowest

    def lowest_total_bits(self) -> int:
        """total_bits(lowest_bits()), from per-layer counts."""
        fan = torch.tensor([m.fan_in for m in self.layers], dtype=torch.int64)
        if self.bits[0] != PRUNE_BITS or len(self.s) == 0:
            return self.bits[0] * int(self.fan.sum()) + self.fixed_bits
        n_layers = len(self.layers)
        prunable = torch.bincount(self.layer_of[~self.dead & ~self.protected], minlength=n_layers)
        protected = torch.bincount(self.layer_of[~self.dead & self.protected], minlength=n_layers)
        kept = (prunable - self.cap).clamp(min=0) + protected
        return int((kept * fan).sum()) * self.bits[1] + self.fixed_bits

    def check_reachable(self) -> None:
        minimum = self.lowest_total_bits()
        if minimum > self.limit:
            c = self.config
            raise BudgetError(
                f"budget {self.budget:g} bits/weight cannot be met: the lowest reachable average is "
                f"{minimum / self.n_weights:.4f} (candidate bits {list(c.bits)}, {c.guard_text()}, "
                f"{len(self.fixed)} fixed-bit layer(s) holding {self.fixed_bits / self.n_weights:.4f} bits/weight); "
                "raise the budget or relax these"
            )


def _layer_overheads(layers: list[LayerDesc], choices: list[RowChoice], group_size: int) -> torch.Tensor:
    """Per layer, the extra plan bits of a grouped row over b * K (`quantizer.row_choice_costs`, the one definition
    of the costs); the solvers rely on it being the same for every grouped width of a layer, and per-row rows
    costing b * K, which is checked here."""
    out = []
    for m in layers:
        costs = row_choice_costs(m.fan_in, choices, group_size)
        extra = {cost - c.bits * m.fan_in for c, cost in zip(choices, costs) if c.grouped}
        plain = all(cost == c.bits * m.fan_in for c, cost in zip(choices, costs) if not c.grouped)
        if len(extra) != 1 or not plain:
            raise RuntimeError(f"{m.name}: row costs {costs} of {[c.label for c in choices]} are not b * K plus one "
                               "grouped overhead: the allocation solvers assume that form")  # fmt: skip
        out.append(extra.pop())
    return torch.tensor(out, dtype=torch.int64)


def _guarded(s: torch.Tensor, dead: torch.Tensor, config: AllocationConfig) -> torch.Tensor:
    """The rows of one layer (s: its columns of config.bits) that the dual-threshold guard keeps from pruning."""
    protected = torch.zeros(len(s), dtype=torch.bool)
    if PRUNE_BITS not in config.bits or len(s) == 0:
        return protected
    s0 = s[:, config.bits.index(PRUNE_BITS)]
    if config.prune_abs_threshold is not None:
        protected |= s0 > config.prune_abs_threshold
    live = s0[~dead]
    if config.prune_rel_threshold is not None and len(live):
        protected |= s0 > config.prune_rel_threshold * float(torch.quantile(live, 0.5))
    return protected & ~dead


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
    if bool((groups[1:] >= groups[:-1]).all()):  # already grouped (the rows of a problem are, layer by layer)
        order, sorted_groups = torch.arange(len(groups)), groups
    else:
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
    grouped: torch.Tensor | None = None  # [C] bool: group-wise scales (None: a problem without grouped choices)


def greedy_allocate(problem: AllocationProblem) -> AllocationResult:
    """The paper's staged greedy demotion (module docstring), over the problem's choices (columns) in descending
    cost: the stage from column hi moves the channels still there to their next cheaper allowed choice."""
    problem.check_reachable()
    p = problem
    nb = len(p.choices)
    col = torch.full((len(p.s),), nb - 1, dtype=torch.int64)  # every channel at 16 bits (the costliest column)
    total = int(p.cost_at(nb - 1).sum()) + p.fixed_bits
    name_rank = _name_rank(p)
    last_step = 0
    demotions = 0
    stage_log = []

    def demote(order: torch.Tensor, lo, savings: torch.Tensor) -> tuple[bool, int]:
        """Demote `order` to column(s) `lo` (one, or one per row) one by one until the budget holds; (whether it
        does, rows demoted)."""
        nonlocal total, last_step, demotions
        if len(order) == 0:
            return total <= p.limit, 0
        cum = savings.cumsum(0)
        need = total - p.limit
        hit = (cum >= need).nonzero()
        stop = int(hit[0]) + 1 if len(hit) else len(order)
        col[order[:stop]] = lo if isinstance(lo, int) else lo[:stop]
        total -= int(cum[stop - 1])
        last_step = int(savings[stop - 1])
        demotions += stop
        return total <= p.limit, stop

    done = total <= p.limit
    pruning = p.choices[0].bits == PRUNE_BITS
    if not done and pruning:
        dead_idx = p.dead.nonzero().squeeze(1)
        order = dead_idx[_lexsort(name_rank[dead_idx], p.row[dead_idx])]
        done, n = demote(order, 0, p.cost_at(nb - 1, order) - p.cost_at(0, order))
        stage_log.append({"stage": "dead->0", "demoted": n})
    for hi in range(nb - 1, 0, -1):
        if done:
            break
        cand = col == hi
        if hi == 1 and pruning:
            cand &= ~p.protected
        idx = cand.nonzero().squeeze(1)
        lo = hi - 1  # one column for all, or one per row:
        if p.has_groups and p.choices[hi - 1].grouped:  # a row without that grouped choice goes on to its twin
            lo = hi - 1 - (p.overhead[idx] == 0).long()
        saving = p.cost_at(hi, idx) - p.cost_at(lo, idx)  # plan bits saved: (b_hi - b_lo) * K without groups
        rho = (p.s[idx, lo] - p.s[idx, hi]) / saving.double()
        perm = _lexsort(rho, name_rank[idx], p.row[idx])
        order, saving = idx[perm], saving[perm]
        lo = lo if isinstance(lo, int) else lo[perm]
        if hi == 1 and pruning:
            # dead rows were all pruned before the stages, so every candidate here counts against its layer's cap
            # (column 0 below column 1 is one column for all rows: lo is an int here)
            keep = _rank_within(p.layer_of[order]) < p.cap[p.layer_of[order]]
            order, saving = order[keep], saving[keep]
        done, n = demote(order, lo, saving)
        stage_log.append({"stage": f"{p.choices[hi].label}->{p.choices[hi - 1].label}", "demoted": n})
    if not done:  # unreachable after check_reachable; kept as a guard against a logic error
        raise BudgetError(f"greedy demotion could not reach {p.budget:g} bits/weight")
    return AllocationResult(
        torch.tensor(p.bits, dtype=torch.int64)[col],
        {
            "solver": "greedy",
            "demotions": demotions,
            "last_step_bits_per_weight": last_step / p.n_weights,
            "stages": stage_log,
        },
        p.column_grouped[col] if p.has_groups else None,
    )


# ---------------------------------------------------------------------------------------------------------------
_CHUNK = 1 << 15  # rows per block in the passes over all channels (temporaries of ~1 MB, in cache)
_SAMPLE = 1 << 16  # channels of the sample that brackets lambda before the first full pass


def _midpoint(lo: float, hi: float) -> float | None:
    """The double halfway between lo and hi (0 <= lo < hi) in their bit patterns: geometric steps over a wide
    bracket, arithmetic ones over a narrow one; None once lo and hi are adjacent doubles."""
    a = struct.unpack("<q", struct.pack("<d", lo))[0]
    b = struct.unpack("<q", struct.pack("<d", hi))[0]
    m = (a + b) // 2
    return None if m in (a, b) else struct.unpack("<d", struct.pack("<q", m))[0]


@dataclass
class _Choice:
    """The relaxed minimizer at one multiplier over some rows: a column per row, the caps' multipliers mu per layer,
    the total cost (bits) and error of the rows; with caps, per row the gain of pruning (best non-zero value minus
    the 0-bit value; -inf for a row whose best choice is not 0 bits) and its best non-zero column."""

    col: torch.Tensor
    mu: torch.Tensor
    cost: int
    err: float
    gain: torch.Tensor | None = None
    nz: torch.Tensor | None = None


def _turned_away(gain: torch.Tensor, layer: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Positions of the candidates a cap turns away: per layer (the candidates come layer by layer), all but the
    cap's worth of largest gains, ties to the lower position."""
    if len(gain) <= 1 << 17:  # two global sorts
        order = torch.sort(-gain, stable=True).indices
        order = order[torch.sort(layer[order], stable=True).indices]
        return order[_rank_within(layer[order]) >= cap[layer[order]]]
    ids, counts = torch.unique_consecutive(layer, return_counts=True)  # one short sort per layer: faster here
    turned, start = [], 0
    for li, n_l in zip(ids.tolist(), counts.tolist()):
        order = torch.sort(gain[start : start + n_l], descending=True, stable=True).indices
        turned.append(order[int(cap[li]) :] + start)
        start += n_l
    return torch.cat(turned)


class _Relaxation:
    """The budget constraint relaxed with a multiplier lambda >= 0, the caps kept (module docstring).

    Every channel takes argmin_b s(b) + lambda * b * K over the widths it may take (ties to fewer bits; a row the
    pruning guard protects has no 0-bit choice); in a layer whose cap binds, the rows that gain most from pruning
    keep 0 bits and the rest take their best non-zero width. mu_l, the gain of the best row the cap turns away, is
    the cap's multiplier: with it, every choice has a reduced cost rc >= 0 and the identity of the module docstring
    holds. With grouped choices a choice's cost is bits * K plus, for a grouped column, the channel's overhead (the
    `over_*` tensors; None without groups, where every formula is the plain bits * K one), and a grouped column is
    not allowed (+inf) for a channel whose rows fit in one group (overhead 0).
    """

    def __init__(self, problem: AllocationProblem):
        p = self.p = problem
        self.bits_f = torch.tensor(p.bits, dtype=torch.float64)
        self.bits_i = torch.tensor(p.bits, dtype=torch.int64)
        self.fan_f = p.fan.double()
        self.n, self.nb = p.s.shape
        self.grouped_b = p.column_grouped
        self.grouped_f = p.column_grouped.double()
        self.over_i = p.overhead
        self.over_f = None if p.overhead is None else p.overhead.double()
        # every allocation's cost is a multiple of gcd(bits) * gcd(fan-ins) (with groups: of the gcd of every
        # choice's cost): round the bits available down to it (the same constraint, and a tighter dual bound than
        # with bits no allocation can use)
        layer_costs = self._layer_costs()
        if layer_costs is None:
            fans = [int(m.fan_in) for m in p.layers if m.fan_in > 0 and m.out_features > 0]
            lattice = math.gcd(*[b for b in p.bits if b]) * (math.gcd(*fans) if fans else 1)
        else:
            lattice = math.gcd(*[c for costs in layer_costs for c in costs if c]) or 1
        self.A = p.auto_limit - p.auto_limit % lattice
        self.n_layers = len(p.layers)
        self.no_prune = None  # rows without the 0-bit choice (None: no such row)
        self.cap_row = torch.zeros(self.n, dtype=torch.bool)  # rows counted by a cap that can bind
        if p.bits[0] == PRUNE_BITS and self.n:
            no_prune = p.protected & ~p.dead
            self.no_prune = no_prune if bool(no_prune.any()) else None
            prunable = ~p.dead & ~p.protected
            n_prunable = torch.bincount(p.layer_of[prunable], minlength=self.n_layers)
            capped = p.cap < n_prunable
            if bool(capped.any()):
                self.cap_row = capped[p.layer_of] & ~p.dead
        self.any_cap = bool(self.cap_row.any())

    def _layer_costs(self) -> list[list[int]] | None:
        """With grouped choices: per layer (with rows), the costs of its allowed choices, ascending; else None."""
        p = self.p
        if self.over_i is None:
            return None
        starts = torch.cumsum(torch.tensor([m.out_features for m in p.layers], dtype=torch.int64), 0)
        out = []
        for m, end in zip(p.layers, starts.tolist()):
            if m.out_features == 0:
                continue
            over = int(self.over_i[end - 1])
            out.append([b * m.fan_in + (over if g else 0) for b, g in zip(p.bits, self.grouped_b.tolist())
                        if not (g and over == 0)])  # fmt: skip
        return out

    # ---- costs: b * K, plus a grouped column's overhead (the problem's, one definition)
    def cost_rows(self, rows) -> torch.Tensor:
        """[n, nb] int64 costs of every choice of `rows` (a slice or an index tensor)."""
        return self.p.cost_matrix(rows)

    def cost_at(self, col: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """[n] int64 cost of column col[i] of row rows[i]."""
        return self.p.cost_at(col, rows)

    def forbidden(self, rows) -> torch.Tensor | None:
        """[n, nb] bool: the grouped columns of rows whose layer fits in one group (None: no grouped column)."""
        return self.p.forbidden(rows)

    # ---- values s + lam * b * K (+ mu on the 0-bit column of the capped rows), +inf where a row may not go
    def values(self, lam: float, rows, mu: torch.Tensor | None = None) -> torch.Tensor:
        """rows: a slice or an index tensor."""
        p = self.p
        v = torch.addcmul(p.s[rows], self.fan_f[rows, None], self.bits_f[None, :], value=lam)
        if self.over_f is not None:
            v.addcmul_(self.over_f[rows, None], self.grouped_f[None, :], value=lam)
            v.masked_fill_(self.forbidden(rows), math.inf)
        if self.no_prune is not None:
            v[:, 0].masked_fill_(self.no_prune[rows], math.inf)
        if mu is not None and self.any_cap:
            v[:, 0].add_(torch.where(self.cap_row[rows], mu[p.layer_of[rows]], 0.0))
        return v

    def _blocks(self, rows: torch.Tensor | None):
        n = self.n if rows is None else len(rows)
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            yield lo, hi, (slice(lo, hi) if rows is None else rows[lo:hi])

    def choose(self, lam: float, rows: torch.Tensor | None = None, cap: torch.Tensor | None = None) -> _Choice:
        """The relaxed minimizer at lam over `rows` (None: all). cap: the prunes per layer left to these rows (None:
        the problem's caps), which must hold every row of a capped layer that could still take or lose 0 bits."""
        p = self.p
        cap = p.cap if cap is None else cap
        n = self.n if rows is None else len(rows)
        col = torch.empty(n, dtype=torch.int64)
        gain = nzs = None
        if self.any_cap:
            gain = torch.full((n,), -math.inf, dtype=torch.float64)
        cost, err = 0.0, 0.0
        cand_pos = []
        for lo, hi, where in self._blocks(rows):
            v = self.values(lam, where)
            c = torch.argmin(v, dim=1)  # the first minimum: ties go to fewer bits
            col[lo:hi] = c
            cost += float((self.bits_f[c] * self.fan_f[where]).sum())  # exact: integers below 2**53
            if self.over_f is not None:
                cost += float((self.grouped_f[c] * self.over_f[where]).sum())
            err += float(p.s[where].gather(1, c[:, None]).sum())
            if self.any_cap:
                want = ((c == 0) & self.cap_row[where]).nonzero().squeeze(1)
                if len(want):
                    nz_val, nz = v[want, 1:].min(dim=1)
                    cand_pos.append(want + lo)
                    gain[want + lo] = nz_val - v[want, 0]
                    c[want] = nz + 1  # c is a copy of the block's columns here: the best non-zero ones
                if nzs is None:
                    nzs = torch.empty(n, dtype=torch.int64)
                nzs[lo:hi] = c
        mu = torch.zeros(self.n_layers, dtype=torch.float64)
        if cand_pos:
            pos = torch.cat(cand_pos)
            idx = pos if rows is None else rows[pos]
            layer = p.layer_of[idx]
            over = (torch.bincount(layer, minlength=self.n_layers) > cap)[layer]
            if over.any():
                pos, layer, idx = pos[over], layer[over], idx[over]
                g = gain[pos]
                turned = _turned_away(g, layer, cap)
                mu.scatter_reduce_(0, layer[turned], g[turned], reduce="amax", include_self=True)
                t_pos, t_idx = pos[turned], idx[turned]
                t_nz = nzs[t_pos]
                col[t_pos] = t_nz
                cost += float(((self.bits_f[t_nz] - self.bits_f[0]) * self.fan_f[t_idx]).sum())
                if self.over_f is not None:  # column 0 (pruned) is never grouped
                    cost += float((self.grouped_f[t_nz] * self.over_f[t_idx]).sum())
                err += float((p.s[t_idx, t_nz] - p.s[t_idx, 0]).sum())
        return _Choice(col, mu, int(round(cost)), err, gain, nzs)

    def cost_of(self, col: torch.Tensor, rows: torch.Tensor | None = None) -> int:
        return int(self.cost_at(col, slice(None) if rows is None else rows).sum())

    def error_of(self, col: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        s = self.p.s if rows is None else self.p.s[rows]
        return float(s.gather(1, col[:, None]).sum()) if len(col) else 0.0

    def dual(self, lam: float, cost: int, err: float) -> float:
        """L(lam) from the cost and error of the relaxed minimizer at lam: a lower bound on the optimum of Eq. 7."""
        return err + lam * (cost - self.A)

    def lam_max(self) -> float:
        """A multiplier above which every channel takes its lowest allowed width (two widths differ by at least
        `step` bits per weight, and no two errors of a channel differ by more than max(s) - min(s))."""
        if self.n == 0:
            return 1e-300
        lo, hi = torch.aminmax(self.p.s)
        layer_costs = self._layer_costs()
        if layer_costs is None:
            step = int(min(np.diff(self.p.bits))) if len(self.p.bits) > 1 else 1
        else:  # the smallest cost difference of two allowed choices of one channel (plan bits, not per weight)
            step = min((int(min(np.diff(c))) for c in layer_costs if len(c) > 1), default=1)
        return 2.0 * float(hi - lo) / step + 1e-300

    # ---- the multiplier
    def sweep(self) -> tuple[float, _Choice, float, _Choice, list[tuple[float, _Choice]]]:
        """The smallest lam (to adjacent doubles or 1e-9 relative) whose relaxed minimizer meets the budget:
        (lo, choice at lo, hi, choice at hi, [(lam, choice)] more multipliers for the dual bound); the choice at hi
        meets the budget, the one at lo does not; lo = hi = 0 when lam = 0 already meets it."""
        top = self.lam_max()
        est = self._sample_estimate(top)
        if est is None or est <= 1e-250:
            at0 = self.choose(0.0)
            if at0.cost <= self.A:
                return 0.0, at0, 0.0, at0, []
            return self._bisect(0.0, at0, top, self.choose(top))
        # a tight bracket around the sample's multiplier, checked (and widened) on every channel
        lo, hi = est / 1.1, min(top, est * 1.1)
        at_lo, at_hi = None, self.choose(hi)
        while at_hi.cost > self.A:  # the sample put hi too low
            if hi >= top:
                raise BudgetError(f"no multiplier meets {self.p.budget:g} bits/weight (a logic error)")
            lo, at_lo = hi, at_hi
            hi = min(top, hi * 1.5)
            at_hi = self.choose(hi)
        while at_lo is None:
            if lo <= 1e-280:
                at0 = self.choose(0.0)
                if at0.cost <= self.A:
                    return 0.0, at0, 0.0, at0, []
                lo, at_lo = 0.0, at0
                break
            c = self.choose(lo)
            if c.cost > self.A:
                at_lo = c
            else:  # the sample put lo too high
                hi, at_hi = lo, c
                lo = lo / 1.5
        return self._bisect(lo, at_lo, hi, at_hi)

    def _sample_estimate(self, top: float) -> float | None:
        """The multiplier of an evenly strided sample of the channels (caps left out), or None when the problem is
        small enough to bisect whole."""
        p = self.p
        step = self.n // _SAMPLE
        if step < 4:
            return None
        rows = torch.arange(0, self.n, step)
        target = self.A * float(self.fan_f[rows].sum()) / float(self.fan_f.sum())
        cap = None
        if self.any_cap:  # the caps scaled to the sampled share of each layer
            share = torch.bincount(p.layer_of[rows], minlength=self.n_layers).double()
            share /= torch.bincount(p.layer_of, minlength=self.n_layers).double().clamp(min=1)
            cap = torch.round(p.cap.double() * share).long()
        lo, hi = 0.0, top
        while hi - lo > 1e-3 * hi:
            mid = _midpoint(lo, hi)
            if mid is None:
                break
            if self.choose(mid, rows, cap).cost <= target:
                hi = mid
            else:
                lo = mid
        return hi

    def _bisect(self, lo: float, at_lo: _Choice, hi: float, at_hi: _Choice):
        """Bisection over the channels whose choice can still change inside the bracket. Without a cap, a channel
        moves monotonically with lam, so one with the same width at both ends keeps it in between. A row of a
        capped layer prunes at lam iff its gain(lam) > mu(lam) (ties aside), and both rise with lam: one with
        gain(lo) > mu(hi) prunes throughout, one with gain(hi) < mu(lo) never does (and then moves monotonically
        among the non-zero widths); the rest stay in, and the rows frozen at 0 bits use up their layer's cap.
        Totals are kept as frozen part + active part per end; the active rows' data is kept compacted."""
        p = self.p
        col_lo, col_hi = at_lo.col, at_hi.col  # full arrays, exact for the frozen rows (written back when frozen)
        mu_lo, mu_hi = at_lo.mu, at_hi.mu
        ends = {"lo": [at_lo.cost, at_lo.err], "hi": [at_hi.cost, at_hi.err]}  # the active part
        frozen_cost, frozen_err = 0, 0.0
        cap = p.cap.clone()
        active = None  # every row; then an index tensor
        a = {"col_lo": col_lo, "col_hi": col_hi}
        if self.any_cap:
            a.update(gain_lo=at_lo.gain, gain_hi=at_hi.gain, nz_lo=at_lo.nz, nz_hi=at_hi.nz)
            a.update(capr=self.cap_row, layer=p.layer_of)
        while True:
            keep = a["col_lo"] != a["col_hi"]
            if self.any_cap:
                capr, layer = a["capr"], a["layer"]
                pruning = a["gain_lo"] > mu_hi[layer]
                never = (a["gain_hi"] < mu_lo[layer]) & (a["nz_lo"] == a["nz_hi"])
                keep = torch.where(capr, ~(pruning | never), keep)
            if not bool(keep.all()):
                idx = keep.nonzero().squeeze(1)
                rows = idx if active is None else active[idx]
                if active is not None:  # write the frozen rows back (same width at both ends)
                    gone = ~keep
                    col_lo[active[gone]] = a["col_hi"][gone]
                    col_hi[active[gone]] = a["col_hi"][gone]
                if self.any_cap:
                    frozen0 = ~keep & (a["col_hi"] == 0) & a["capr"]
                    cap -= torch.bincount(a["layer"][frozen0], minlength=self.n_layers)
                a = {k: v[idx] for k, v in a.items()}
                active = rows
                # move the frozen rows' share of the totals
                kept_hi = [self.cost_of(a["col_hi"], active), self.error_of(a["col_hi"], active)]
                kept_lo = [self.cost_of(a["col_lo"], active), self.error_of(a["col_lo"], active)]
                frozen_cost += ends["hi"][0] - kept_hi[0]
                frozen_err += ends["hi"][1] - kept_hi[1]
                ends = {"lo": kept_lo, "hi": kept_hi}
            elif active is None:
                active = torch.arange(self.n)
            mid = _midpoint(lo, hi)
            if mid is None or hi - lo <= 1e-9 * hi or len(active) == 0:
                break
            c = self.choose(mid, active, cap)
            end = "hi" if frozen_cost + c.cost <= self.A else "lo"
            if end == "hi":
                hi, mu_hi = mid, c.mu
            else:
                lo, mu_lo = mid, c.mu
            ends[end] = [c.cost, c.err]
            a["col_" + end] = c.col
            if self.any_cap:
                a["gain_" + end], a["nz_" + end] = c.gain, c.nz
        col_lo[active], col_hi[active] = a["col_lo"], a["col_hi"]
        at_lo = _Choice(col_lo, mu_lo, frozen_cost + ends["lo"][0], frozen_err + ends["lo"][1])
        at_hi = _Choice(col_hi, mu_hi, frozen_cost + ends["hi"][0], frozen_err + ends["hi"][1])
        # L is concave and below both ends' lines; where they cross is its maximum when no other choice is optimal
        # in between (many channels sharing one breakpoint, say): evaluate it there too (only the active rows move)
        extra = []
        if len(active) and at_lo.cost > at_hi.cost:
            cross = (at_hi.err - at_lo.err) / (at_lo.cost - at_hi.cost)
            if lo < cross < hi:
                c = self.choose(cross, active, cap)
                col = col_hi.clone()
                col[active] = c.col
                extra.append((cross, _Choice(col, c.mu, frozen_cost + c.cost, frozen_err + c.err)))
        return lo, at_lo, hi, at_hi, extra

    # ---- primal repair
    def fill(self, col: torch.Tensor, spare: int, zero_gain: bool = False) -> tuple[int, float]:
        """Spend `spare` bits on upgrades, in place; returns (bits left, change of the error). zero_gain=False:
        upgrades that lower the error, best error saved per bit first, each taken if it still fits (one per channel
        and round; rounds until none fits); True: the highest width that fits and does not raise a channel's
        error, in channel order (spends what the optimum leaves without raising its error)."""
        p = self.p
        step = torch.cat([self.bits_i[1:] - self.bits_i[:-1], torch.zeros(1, dtype=torch.int64)])
        d_err = 0.0
        for _ in range(16):
            if spare <= 0:
                break
            nxt = self._cheapest_upgrade(col, step)  # of each channel (0: at the top already)
            rows = ((nxt > 0) & (nxt <= spare)).nonzero().squeeze(1)
            if len(rows) == 0:
                break
            # each channel's best upgrade, block by block; of a block only the best few can matter to the greedy
            keep_per_block = spare // max(1, int(nxt[rows].min())) + 64
            found = []
            for _, _, where in self._blocks(rows):
                cur = col[where]
                s = p.s[where]
                if self.over_i is None:
                    dcost = (self.bits_i[None, :] - self.bits_i[cur][:, None]) * p.fan[where, None]
                else:
                    dcost = self.cost_rows(where) - self.cost_at(cur, where)[:, None]
                saving = s.gather(1, cur[:, None]) - s
                ok = (dcost > 0) & (dcost <= spare) & ((saving >= 0) if zero_gain else (saving > 0))
                if self.over_i is not None:
                    ok &= ~self.forbidden(where)
                if zero_gain:
                    score = torch.where(ok, dcost.double(), -1.0)  # the highest width that fits
                else:
                    score = torch.where(ok, saving / dcost.clamp(min=1).double(), -1.0)
                best, j = score.flip(1).max(dim=1)
                sel = (best > 0).nonzero().squeeze(1)
                if not zero_gain and len(sel) > keep_per_block:
                    sel = sel[torch.topk(best[sel], keep_per_block).indices]
                j = self.nb - 1 - j[sel]
                found.append((where[sel], best[sel], dcost[sel, j], saving[sel, j], j))
            rows, best, d, gain, j = (torch.cat(x) for x in zip(*found))
            if len(rows) == 0:
                break
            if not zero_gain:
                order = torch.sort(-best, stable=True).indices
                rows, j, d, gain = rows[order], j[order], d[order], gain[order]
            taken = []
            while len(d):  # the greedy in that order, each item taken if it still fits: prefix by prefix
                n_fit = int((torch.cumsum(d, 0) <= spare).sum())  # the cumulative sum rises: a prefix fits
                if n_fit:
                    taken.append((rows[:n_fit], j[:n_fit]))
                    spare -= int(d[:n_fit].sum())
                    d_err -= float(gain[:n_fit].sum())
                rest = (d[n_fit:] <= spare).nonzero().squeeze(1) + n_fit
                rows, j, d, gain = rows[rest], j[rest], d[rest], gain[rest]
            for r, jj in taken:
                col[r] = jj
        return spare, d_err

    def _cheapest_upgrade(self, col: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Cost of each channel's next allowed choice above `col` minus its cost now (0 at the top): allowed costs
        rise with the column, so that is its cheapest upgrade. step: the bits between consecutive columns."""
        if self.over_i is None:
            return step[col] * self.p.fan
        top = col == self.nb - 1
        nxt = (col + 1).clamp(max=self.nb - 1)
        # a grouped column the channel may not take is followed by the next per-row width (16 is last, per-row)
        nxt = torch.where(self.grouped_b[nxt] & (self.over_i == 0), (nxt + 1).clamp(max=self.nb - 1), nxt)
        return torch.where(top, 0, self.cost_at(nxt) - self.cost_at(col))

    def reduced_costs(self, lam: float, mu: torch.Tensor, threshold: float, base_col: torch.Tensor):
        """Rows with some choice other than their relaxed minimum whose reduced cost is below `threshold` (or whose
        `base_col` is not that minimum), with those choices: (rows, candidate mask [rows, nb], rc [rows, nb])."""
        rows_out, cand_out, rc_out = [], [], []
        for lo, _, where in self._blocks(None):
            v = self.values(lam, where, mu)
            vmin, arg = v.min(dim=1)
            rc = v - vmin[:, None]
            cand = rc < threshold
            core = (cand.sum(dim=1) > 1) | (arg != base_col[where])
            idx = core.nonzero().squeeze(1)
            if len(idx):
                cand_core = cand[idx]
                cand_core[torch.arange(len(idx)), base_col[where][idx]] = True
                rows_out.append(idx + lo)
                cand_out.append(cand_core)
                rc_out.append(rc[idx])
        if not rows_out:
            e = torch.zeros(0, self.nb)
            return torch.zeros(0, dtype=torch.int64), e.bool(), e.double()
        return torch.cat(rows_out), torch.cat(cand_out), torch.cat(rc_out)


def _pareto(group: np.ndarray, cost: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the states not dominated within their group (lower or equal cost and error); one of equals."""
    rank = np.unique(err, return_inverse=True)[1].reshape(-1).astype(np.int64)
    order = np.lexsort((rank, cost, group))
    key = group[order] * (int(rank.max()) + 2) - rank[order]
    best = np.maximum.accumulate(key)
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = key[1:] > best[:-1]
    return order[keep]


def _core_dp(rel: _Relaxation, rows, cand, rc, col, lam, mu, threshold, max_states):
    """Exact search over the core channels `rows` (choices `cand`, reduced costs `rc`; every other channel keeps
    `col`): a dynamic program over the Pareto-optimal partial allocations (cost, error; per count of pruned rows
    where the core could break a cap), layer by layer, that drops every partial allocation whose completions
    provably cost at least `threshold` in the identity of the module docstring (they cannot beat the incumbent).
    Returns (columns for `rows` or None, proven, most states held)."""
    p = rel.p
    order = torch.sort(p.layer_of[rows], stable=True).indices
    rows, cand, rc = rows[order], cand[order].numpy(), rc[order].numpy()
    n, nb = cand.shape
    fixed = torch.ones(rel.n, dtype=torch.bool)
    fixed[rows] = False
    fixed_idx = fixed.nonzero().squeeze(1)
    budget = rel.A - rel.cost_of(col[fixed_idx], fixed_idx)
    layer = p.layer_of[rows].numpy()
    costs = rel.cost_rows(rows).numpy()
    s = p.s[rows].numpy()
    mu = mu.numpy()
    used = torch.bincount(p.layer_of[fixed & rel.cap_row & (col == 0)], minlength=rel.n_layers).numpy()
    free = p.cap.numpy() - used  # prunes the fixed channels leave to the core, per layer
    counted = np.zeros((n, nb), dtype=bool)  # choices that count against a cap
    if p.bits[0] == PRUNE_BITS:
        counted[:, 0] = rel.cap_row[rows].numpy() & cand[:, 0]
    mu_row = np.where(counted[:, 0], mu[layer], 0.0)
    in_core = np.zeros(rel.n_layers, dtype=bool)
    in_core[layer] = True
    if (free[in_core & (mu > 0)] < 0).any():
        return None, False, 0
    const = lam * budget + float((mu * np.maximum(free, 0)).sum())  # s(x) - L = const + sum_core g(x)
    outside = float((mu * np.maximum(free, 0))[~in_core].sum())  # cap slack of the layers without core channels
    big = np.iinfo(np.int64).max // 4
    g = np.where(cand, rc - lam * costs - mu_row[:, None] * counted, np.inf)
    lo_cost = np.where(cand, costs, big).min(axis=1)
    hi_cost = np.where(cand, costs, 0).max(axis=1)
    min_rest = np.concatenate([np.cumsum(lo_cost[::-1])[::-1], [0]])
    max_rest = np.concatenate([np.cumsum(hi_cost[::-1])[::-1], [0]])
    g_rest = np.concatenate([np.cumsum(g.min(axis=1)[::-1])[::-1], [0.0]])
    first = np.ones(n, dtype=bool)
    first[1:] = layer[1:] != layer[:-1]
    last = np.ones(n, dtype=bool)
    last[:-1] = layer[1:] != layer[:-1]
    # prunes still possible in the same layer after position i
    run = np.cumsum(first) - 1
    pr = counted[:, 0].astype(np.int64)
    run_total = np.bincount(run, weights=pr).astype(np.int64)
    rem_pr = run_total[run] - (np.cumsum(pr) - np.concatenate([[0], np.cumsum(run_total)])[run])
    breakable = (run_total > free[layer[first]])[run]  # the core could break this layer's cap
    if min_rest[0] > budget:
        return None, False, 0
    st = {
        "c": np.zeros(1, dtype=np.int64), "e": np.zeros(1), "r": np.zeros(1), "P": np.zeros(1),
        "k": np.zeros(1, dtype=np.int64), "closed": np.zeros(1),
    }  # fmt: skip
    parents, choices = [], []
    proven, most = True, 1
    for i in range(n):
        li = int(layer[i])
        js = np.nonzero(cand[i])[0]
        m = len(js)
        ns = len(st["c"])
        if first[i]:
            st["k"] = np.zeros(ns, dtype=np.int64)
        parent = np.repeat(np.arange(ns), m)
        choice = np.tile(js, ns)
        c = st["c"][parent] + costs[i, choice]
        e = st["e"][parent] + s[i, choice]
        r = st["r"][parent] + rc[i, choice]
        pruned = counted[i, choice]
        k = st["k"][parent] + pruned
        P = st["P"][parent] + mu_row[i] * pruned
        closed = st["closed"][parent]
        ok = c + min_rest[i + 1] <= budget
        if breakable[i]:
            ok &= k <= free[li]
        if last[i]:
            closed = closed + mu[li] * (free[li] - k)
            open_slack = 0.0
        else:
            open_slack = mu[li] * np.maximum(0, free[li] - k - rem_pr[i])
        bound1 = r + lam * np.maximum(0, budget - c - max_rest[i + 1]) + outside + closed + open_slack
        bound2 = const + r - lam * c - P + g_rest[i + 1]
        ok &= np.maximum(bound1, bound2) < threshold
        idx = np.nonzero(ok)[0]
        if len(idx) == 0:
            return None, proven, most
        c, e, r, P, k, closed, parent, choice = (a[idx] for a in (c, e, r, P, k, closed, parent, choice))
        group = k if breakable[i] and not last[i] else np.zeros(len(c), dtype=np.int64)
        keep = _pareto(group, c, e)
        if len(keep) > max_states:
            proven = False
            b = np.maximum(bound1[idx][keep], bound2[idx][keep])
            keep = keep[np.argsort(b, kind="stable")[:max_states]]
        most = max(most, len(keep))
        st = {"c": c[keep], "e": e[keep], "r": r[keep], "P": P[keep], "k": k[keep], "closed": closed[keep]}
        parents.append(parent[keep])
        choices.append(choice[keep])
    best = int(np.argmin(st["e"]))
    out = np.empty(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        out[i] = choices[i][best]
        best = int(parents[i][best])
    result = torch.empty(n, dtype=torch.int64)
    result[order] = torch.from_numpy(out)
    return result, proven, most


def lagrangian_allocate(
    problem: AllocationProblem, max_core: int = 20000, max_states: int = 1 << 16
) -> AllocationResult:
    """The optimal allocation of Eq. 7 (module docstring, "Optimal"): the multiplier sweep, the primal repair,
    then the exact search over the channels that reduced-cost fixing leaves open. Proven optimal unless that core
    exceeds `max_core` channels or the search `max_states` partial allocations; then lower_bound in info is the
    dual bound, and the gap to it is what is known."""
    t0 = time.perf_counter()
    problem.check_reachable()
    rel = _Relaxation(problem)
    lo, at_lo, hi, at_hi, extra = rel.sweep()
    candidates = [(rel.dual(x, c.cost, c.err), x, c.mu) for x, c in [(lo, at_lo), (hi, at_hi), *extra]]
    dual, lam, mu = max(candidates, key=lambda t: t[0])
    col = at_hi.col.clone()
    spare, d_err = rel.fill(col, rel.A - at_hi.cost)
    upper = at_hi.err + d_err
    scale = max(abs(upper), abs(dual), 1e-300)
    info = {"solver": "lagrangian", "lambda": lam, "dual_bound": dual, "core_channels": 0, "core_states": 0}
    proven = upper - dual <= 1e-12 * scale
    if not proven:
        threshold = (upper - dual) * (1 + 1e-9) + 1e-12 * scale
        rows, cand, rc = rel.reduced_costs(lam, mu, threshold, col)
        info["core_channels"] = len(rows)
        if len(rows) <= max_core:
            new, proven, info["core_states"] = _core_dp(rel, rows, cand, rc, col, lam, mu, threshold, max_states)
            if new is not None:
                trial = col.clone()
                trial[rows] = new
                cost, err = rel.cost_of(trial), rel.error_of(trial)
                if cost <= rel.A and err < upper:
                    col, upper, spare = trial, err, rel.A - cost
    spare, _ = rel.fill(col, spare, zero_gain=True)
    upper = rel.error_of(col)  # summed afresh, as problem.error does
    info.update(
        lower_bound=upper if proven else dual,
        proven_optimal=bool(proven),
        unused_bits_per_weight=(problem.auto_limit - rel.A + spare) / problem.n_weights,
        time_s=time.perf_counter() - t0,
    )
    return AllocationResult(rel.bits_i[col], info, rel.grouped_b[col] if problem.has_groups else None)


def dual_bound(problem: AllocationProblem, lam: float) -> float:
    """L(lambda) = min over allocations that keep the caps of sum_c [s_c(b_c) + lambda b_c K_c] - lambda * (bits
    available to the allocated layers): a lower bound on the optimum of Eq. 7 for every lambda >= 0."""
    rel = _Relaxation(problem)
    at = rel.choose(lam)
    return rel.dual(lam, at.cost, at.err)


def solve(problem: AllocationProblem) -> AllocationResult:
    """Run the configured solver; info gets the error, the lower bound (the optimum when the optimal solver proved
    it, else the dual bound) and the gap to it, for either solver."""
    result = greedy_allocate(problem) if problem.config.solver == "greedy" else lagrangian_allocate(problem)
    error = problem.error(result.bits, result.grouped)
    if "lower_bound" not in result.info:
        best = lagrangian_allocate(problem).info
        result.info.update(
            lower_bound=best["lower_bound"],
            dual_bound=best["dual_bound"],
            lower_bound_is_optimum=best["proven_optimal"],
        )
    else:
        result.info["lower_bound_is_optimum"] = result.info["proven_optimal"]
    lower = result.info["lower_bound"]
    gap = max(0.0, error - lower)
    result.info.update(
        total_error=error,
        gap=gap,
        relative_gap=gap / lower if lower > 0 else (0.0 if gap == 0 else math.inf),
        average_bits=problem.total_bits(result.bits, result.grouped) / problem.n_weights,
        budget=problem.budget,
        minimum_average_bits=problem.lowest_total_bits() / problem.n_weights,
        pruned_rows=int((result.bits == PRUNE_BITS).sum()),
        dead_rows_pruned=int(((result.bits == PRUNE_BITS) & problem.dead).sum()),
        protected_rows=int(problem.protected.sum()),
    )
    if problem.has_groups:
        result.info.update(group_size=problem.group_size, grouped_rows=int(result.grouped.sum()))
    return result


# ---------------------------------------------------------------------------------------------------------------
def allocate_plan(sens: Sensitivity, budget: float, config: AllocationConfig | None = None) -> Plan:
    """Allocate bits from sensitivities under `budget` (average bits per weight) and emit the Plan."""

    config = config or AllocationConfig()
    problem = AllocationProblem.from_sensitivity(sens, budget, config)
    result = solve(problem)
    layers: dict[str, LayerPlan] = {}
    start = 0  # the rows of the allocated layers are contiguous, in layer order (from_tables)
    for meta in problem.layers:
        rows = result.bits[start : start + meta.out_features].tolist()
        flags = None if result.grouped is None else result.grouped[start : start + meta.out_features].tolist()
        start += meta.out_features
        layers[meta.name] = LayerPlan(
            meta.name, meta.role, meta.kind, meta.out_features, meta.fan_in, rows, "row",
            problem.group_size if flags and any(flags) else None, flags if flags and any(flags) else None,
        )  # fmt: skip
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
