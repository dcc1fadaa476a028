"""Which layers are quantized, and how: name rules with one written precedence, and the paper's default template.

Every quantizable layer of a policy has a *role* (given by its adapter): "vision", "projector", "language",
"action" (the action expert), "action_head" (the small in/out projections around the action expert) or "other".
A `PlanTemplate` maps roles and layer names to a *rule*:

    "auto"        the layer's rows get per-channel bits from the allocation (and count in the budget)
    "skip"        the layer is not quantized at all: it stays in the source dtype, is not in the plan and does not
                  count in the average-bit budget (the paper keeps the projector and action head in bf16 this way)
    an int b      every row of the layer is fixed at b in {0, 2, 4, 8, 16}; the layer is in the plan and counts
                  in the budget (e.g. 16 to keep a layer full precision *inside* the budget, 8 to force W8)

Precedence, for a layer `name` with role `role` (the same for `NameRules` wherever names are matched):
    1. an exact name key (`"model.vlm.multi_modal_projector.linear"`),
    2. otherwise the longest matching regex key (`"re:<pattern>"`, matched with `re.fullmatch` against the
       whole name; the longer pattern text is taken as the more specific one; equal lengths: the first declared),
    3. otherwise the role's default (`roles`), and "skip" for a role that has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qvla_quant.bits import ROW_BITS

ROLES: tuple[str, ...] = ("vision", "projector", "language", "action", "action_head", "other")
RULES: tuple[str, ...] = ("auto", "skip")

# The paper (Sec. 4.1): vision backbone, language model and action expert get per-channel bits; the projector
# and the action head stay in full precision and out of the budget.
DEFAULT_ROLE_RULES: dict[str, str | int] = {
    "vision": "auto",
    "language": "auto",
    "action": "auto",
    "projector": "skip",
    "action_head": "skip",
    "other": "skip",
}

REGEX_PREFIX = "re:"


class NameRules:
    """An ordered map from exact names or "re:" patterns to values, resolved with the precedence above."""

    def __init__(self, rules: dict[str, Any] | None = None):
        self.exact: dict[str, Any] = {}
        self.patterns: list[tuple[str, re.Pattern, Any]] = []
        for key, value in (rules or {}).items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"name rule keys must be non-empty strings, got {key!r}")
            if key.startswith(REGEX_PREFIX):
                try:
                    compiled = re.compile(key[len(REGEX_PREFIX) :])
                except re.error as e:
                    raise ValueError(f"name rule {key!r} is not a valid regular expression: {e}") from None
                self.patterns.append((key, compiled, value))
            else:
                self.exact[key] = value
        # stable sort: longest pattern first, declaration order among equals
        self.patterns.sort(key=lambda p: -len(p[0]))

    def match(self, name: str) -> tuple[str, Any] | None:
        """(the key that decided, its value), or None when no rule matches."""
        if name in self.exact:
            return name, self.exact[name]
        for key, compiled, value in self.patterns:
            if compiled.fullmatch(name):
                return key, value
        return None

    def resolve(self, name: str, default: Any = None) -> Any:
        hit = self.match(name)
        return default if hit is None else hit[1]


def _check_rule(where: str, rule: Any) -> str | int:
    if isinstance(rule, bool) or not (rule in RULES or (isinstance(rule, int) and rule in ROW_BITS)):
        raise ValueError(f"{where}: rule must be 'auto', 'skip' or a bit-width in {ROW_BITS}, got {rule!r}")
    return rule


@dataclass(frozen=True)
class PlanTemplate:
    """Role defaults plus per-name overrides (exact names or "re:" patterns); see the module docstring."""

    roles: dict[str, str | int] = field(default_factory=lambda: dict(DEFAULT_ROLE_RULES))
    names: dict[str, str | int] = field(default_factory=dict)

    def __post_init__(self):
        for role, rule in self.roles.items():
            if role not in ROLES:
                raise ValueError(f"PlanTemplate.roles: unknown role {role!r}; roles are {ROLES}")
            _check_rule(f"PlanTemplate.roles[{role!r}]", rule)
        for key, rule in self.names.items():
            _check_rule(f"PlanTemplate.names[{key!r}]", rule)
        NameRules(self.names)  # validates the patterns now rather than at first use

    def rule_for(self, name: str, role: str) -> str | int:
        return self.explain(name, role)[0]

    def explain(self, name: str, role: str) -> tuple[str | int, str]:
        """(rule, why): why names the exact key, the pattern or the role default that decided."""
        hit = NameRules(self.names).match(name)
        if hit is not None:
            return hit[1], f"name rule {hit[0]!r}"
        if role in self.roles:
            return self.roles[role], f"role {role!r}"
        return "skip", f"role {role!r} has no rule"

    def to_dict(self) -> dict:
        return {"roles": dict(self.roles), "names": dict(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> PlanTemplate:
        unknown = set(d) - {"roles", "names"}
        if unknown:
            raise ValueError(f"PlanTemplate: unknown keys {sorted(unknown)}")
        roles = dict(DEFAULT_ROLE_RULES)
        roles.update(d.get("roles", {}))
        return cls(roles=roles, names=dict(d.get("names", {})))
