"""Statistics for closed-loop results: success with a Wilson interval, and paired comparisons by exact McNemar.

Closed-loop success is a binomial count, and two policies evaluated on the same seeds are *paired*: a seed that is
hard for one is usually hard for the other, so outcomes correlate strongly, and comparing two independent
intervals throws most of the evidence away. McNemar's test looks only at the discordant seeds (b: A succeeded where
B failed, c: the reverse); under "no difference" each discordant seed is a fair coin, so the exact two-sided
p-value is the binomial tail 2 * P(X <= min(b, c)) with X ~ Bin(b + c, 1/2), capped at 1.

    wilson_interval(23, 30)         -> (0.59, 0.88): a 95% interval for the success rate
    mcnemar_exact(b=8, c=0)         -> 0.0078: eight seeds lost, none won
    compare_paired(a, b)            -> the counts, both rates and the p-value for two outcome lists
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0.

    Preferred to the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage near 0 and 1,
    where good and broken policies live."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c (1.0 when there are none)."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # exact integer arithmetic: the tail sum is exact, then one division
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedComparison:
    """A against B on the same seeds."""

    n: int  # seeds both were evaluated on
    a_successes: int
    b_successes: int
    a_only: int  # seeds A succeeded on and B failed (McNemar's b)
    b_only: int  # the reverse (McNemar's c)
    p_value: float

    @property
    def difference(self) -> float:
        """A's success rate minus B's, over the common seeds."""
        return (self.a_successes - self.b_successes) / self.n if self.n else float("nan")

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def compare_paired(a: Mapping[int, bool] | Sequence[bool], b: Mapping[int, bool] | Sequence[bool]) -> PairedComparison:
    """Pair two outcome sets by seed ({seed: success}) or by position (equal-length lists) and test them."""
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("compare_paired: give two {seed: success} mappings or two lists")
    if isinstance(a, Mapping):
        seeds = sorted(set(a) & set(b))
        pairs = [(bool(a[s]), bool(b[s])) for s in seeds]
    else:
        if len(a) != len(b):
            raise ValueError(f"compare_paired: outcome lists differ in length ({len(a)} vs {len(b)}); pair by seed")
        pairs = [(bool(x), bool(y)) for x, y in zip(a, b)]
    a_only = sum(x and not y for x, y in pairs)
    b_only = sum(y and not x for x, y in pairs)
    return PairedComparison(
        n=len(pairs), a_successes=sum(x for x, _ in pairs), b_successes=sum(y for _, y in pairs),
        a_only=a_only, b_only=b_only, p_value=mcnemar_exact(a_only, b_only),
    )  # fmt: skip
