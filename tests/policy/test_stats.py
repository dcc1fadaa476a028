"""Statistics helpers against values computed independently (scipy.stats.binomtest) and the episode cache."""

from __future__ import annotations

import json
import math

import pytest

from qvla_ros.policy.episode_cache import EpisodeCache, row_key
from qvla_ros.policy.stats import compare_paired, mcnemar_exact, wilson_interval


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [  # scipy.stats.binomtest(k, n).proportion_ci(method="wilson"), scipy 1.x
        (0, 10, 0.0, 0.277533),
        (5, 10, 0.236593, 0.763407),
        (10, 10, 0.722467, 1.0),
        (23, 30, 0.590717, 0.882076),
        (90, 100, 0.825634, 0.944771),
        (1, 100, 0.001767, 0.054486),
    ],
)
def test_wilson_interval_matches_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-6)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(5, 4)


@pytest.mark.parametrize(
    "b, c, p",
    [  # scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue
        (8, 0, 0.0078125),
        (0, 8, 0.0078125),
        (1, 9, 0.021484375),
        (5, 5, 1.0),
        (3, 7, 0.34375),
        (0, 0, 1.0),
        (0, 1, 1.0),
        (10, 25, 0.016673847800120715),
    ],
)
def test_mcnemar_exact_matches_the_binomial_test(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)


def test_mcnemar_large_counts_stay_exact_and_bounded():
    p = mcnemar_exact(400, 480)
    assert 0.0 < p < 0.01 and math.isfinite(p)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_compare_paired_by_seed_uses_only_common_seeds():
    a = {1: True, 2: True, 3: False, 4: True, 9: True}
    b = {1: True, 2: False, 3: False, 4: False, 7: False}
    cmp = compare_paired(a, b)
    assert (cmp.n, cmp.a_successes, cmp.b_successes, cmp.a_only, cmp.b_only) == (4, 3, 1, 2, 0)
    assert cmp.p_value == pytest.approx(0.5) and cmp.difference == pytest.approx(0.5) and not cmp.significant()
    with pytest.raises(ValueError, match="differ in length"):
        compare_paired([True], [True, False])


def test_episode_cache_resumes_and_survives_a_torn_line(tmp_path):
    key = row_key("QVLA W4 / greedy", {"artifact": "abc", "steps": 240})
    assert "/" not in key and key.startswith("QVLA_W4___greedy-")
    assert key != row_key("QVLA W4 / greedy", {"artifact": "abd", "steps": 240})
    cache = EpisodeCache(tmp_path, key)
    cache.add({"seed": 1000, "success": True})
    cache.add({"seed": 1001, "success": False})
    with cache.path.open("a") as f:  # a crash in mid-write
        f.write('{"seed": 1002, "succ')
    again = EpisodeCache(tmp_path, key)
    assert len(again) == 2 and 1000 in again and 1002 not in again
    assert again.missing([1000, 1001, 1002, 1003]) == [1002, 1003]
    again.add({"seed": 1002, "success": True})
    lines = again.path.read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [1000, 1001, 1002]
    assert [e["success"] for e in EpisodeCache(tmp_path, key).episodes([1002, 1000, 5])] == [True, True]
