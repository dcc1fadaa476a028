"""The config dataclasses: validation on construction, JSON round trips, versions, and the hashes that must not move."""

from __future__ import annotations

import json

import pytest

from qvla_quant.config import (
    ActivationQuantConfig,
    AllocationConfig,
    CalibrationConfig,
    Config,
    QuantConfig,
    WeightQuantConfig,
)
from qvla_quant.roles import PlanTemplate

EXAMPLES = [
    WeightQuantConfig(),
    WeightQuantConfig(clip_search=False, clip_grid=7, clip_min_ratio=0.8),
    ActivationQuantConfig(),
    ActivationQuantConfig(bits=8),
    QuantConfig(),
    QuantConfig(weight=WeightQuantConfig(clip_grid=3), activation=ActivationQuantConfig(bits=8)),
    AllocationConfig(),
    AllocationConfig(
        bits=(0, 2, 3, 4, 6, 8),
        solver="lagrangian",
        max_pruned_fraction=0.2,
        prune_abs_threshold=1e-6,
        prune_rel_threshold=0.05,
        prune_dead=False,
        activation_bits=8,
        template=PlanTemplate(names={"re:.*lm_head": 16}),
    ),
    CalibrationConfig(),
    CalibrationConfig(
        bits=(0, 2, 3, 4, 16),
        method="exact",
        proxy="gain",
        exact_fraction=0.5,
        rank_sample=0,
        channels_per_pass=3,
        max_exact_dims=10,
        n_probes=2,
        proxy_group_weights=1000,
        seed=7,
        weight=WeightQuantConfig(clip_search=False),
        template=PlanTemplate(names={"fc1": 8}),
        store_dir="/tmp/x",
        progress=False,
        prefix_cache=False,
    ),
]


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: type(c).__name__)
def test_round_trip_through_json(config):
    d = config.to_dict()
    assert d["version"] == type(config).VERSION == 1
    back = type(config).from_dict(json.loads(json.dumps(d)))
    assert back == config and back.to_dict() == d


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: type(c).__name__)
def test_dicts_without_a_version_are_version_1_and_newer_ones_are_refused(config):
    d = config.to_dict(version=False)
    assert "version" not in json.dumps(d)  # nested configs too: what hashes are taken over
    assert type(config).from_dict(d) == config
    with pytest.raises(ValueError, match=f"{type(config).__name__}: version 2 .* newer qvla_quant"):
        type(config).from_dict({**d, "version": 2})
    with pytest.raises(ValueError, match=rf"{type(config).__name__}: unknown keys \['colour'\]"):
        type(config).from_dict({**d, "colour": "red"})
    with pytest.raises(TypeError, match="needs a dict"):
        type(config).from_dict([d])


def test_every_config_shares_the_base():
    for cls in (WeightQuantConfig, ActivationQuantConfig, QuantConfig, AllocationConfig, CalibrationConfig):
        assert issubclass(cls, Config)
        assert cls.to_dict is Config.to_dict and cls.from_dict.__func__ is Config.from_dict.__func__


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: WeightQuantConfig(clip_grid=0), "clip_grid"),
        (lambda: WeightQuantConfig(clip_min_ratio=0), "clip_min_ratio"),
        (lambda: ActivationQuantConfig(bits=4), "activation bits"),
        (lambda: QuantConfig(weight="w"), "QuantConfig"),
        (lambda: AllocationConfig(bits=(5,)), "AllocationConfig.bits"),
        (lambda: AllocationConfig(solver="magic"), "AllocationConfig.solver"),
        (lambda: AllocationConfig(max_pruned_fraction=1.5), "max_pruned_fraction"),
        (lambda: AllocationConfig(prune_rel_threshold=-1), "prune_rel_threshold"),
        (lambda: AllocationConfig(prune_threshold=1.0, prune_abs_threshold=2.0), "former name"),
        (lambda: AllocationConfig(activation_bits=4), "activation bits"),
        (lambda: CalibrationConfig(bits=(16,)), "CalibrationConfig.bits"),
        (lambda: CalibrationConfig(method="fast"), "CalibrationConfig.method"),
        (lambda: CalibrationConfig(exact_fraction=2.0), "exact_fraction"),
        (lambda: CalibrationConfig(channels_per_pass=0), "channels_per_pass"),
        (lambda: CalibrationConfig(rank_sample=-1), "rank_sample"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_nested_dicts_are_validated_like_configs():
    assert QuantConfig.from_dict({"weight": {"clip_grid": 5}, "activation": {"bits": 8}}) == QuantConfig(
        WeightQuantConfig(clip_grid=5), ActivationQuantConfig(8)
    )
    with pytest.raises(ValueError, match="WeightQuantConfig: unknown keys"):
        QuantConfig.from_dict({"weight": {"grid": 5}, "activation": {}})
    with pytest.raises(ValueError, match="ActivationQuantConfig: version 9"):
        QuantConfig.from_dict({"weight": {}, "activation": {"version": 9}})


def test_allocation_former_threshold_name_is_read_but_not_written():
    old = AllocationConfig.from_dict({"prune_threshold": 0.5})
    assert old.prune_abs_threshold == 0.5 and "prune_threshold" not in old.to_dict()
