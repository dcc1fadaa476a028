"""The configuration dataclasses of qvla_quant, in one place, with one way to and from JSON.

    WeightQuantConfig      how a weight row is quantized (range clipping search)
    ActivationQuantConfig  activation bits of every quantized layer (16, or 8 = per-token int8)
    QuantConfig            the two together: what a Plan records and the packed model computes with
    AllocationConfig       how bits are allocated from sensitivities (`qvla_quant.allocation`)
    CalibrationConfig      how sensitivities are measured (`qvla_quant.sensitivity`)

Every config is a frozen dataclass, validated on construction (`__post_init__` raises ValueError naming the field),
and round-trips through `to_dict` / `from_dict` (plain JSON types). `to_dict` writes the class's `VERSION` under
"version"; `from_dict` reads dicts without one as version 1 (what files written before configs carried a version
hold), refuses versions newer than it knows, and refuses unknown keys, naming them. Like torchao's AOBaseConfig, a
config that changes meaning bumps its VERSION and teaches `from_dict` the old one.

Hashes of what determines the quantized weights (`Plan.hash`, the sensitivity store's key) are taken over
`to_dict(version=False)`, so that they stay those of the files written before the version key existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from qvla_quant.bits import BIT_CHOICES, GROUP_SIZES, GROUPED_BITS, KEEP_BITS, ROW_BITS
from qvla_quant.roles import PlanTemplate

SOLVERS = ("greedy", "lagrangian")
METHODS = ("two_stage", "proxy", "exact")  # how CalibrationConfig measures
PROXIES = ("aligned", "gain")
ACTIVATION_BITS = (8, 16)


def _plain(value: Any, version: bool) -> Any:
    """A JSON-ready copy of a field value: configs and templates as dicts, tuples as lists."""
    if isinstance(value, Config):
        return value.to_dict(version=version)
    if isinstance(value, PlanTemplate):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v, version) for v in value]
    return value


class Config:
    """Shared base of the config dataclasses (see the module docstring)."""

    VERSION: ClassVar[int] = 1
    # fields left out of to_dict (e.g. a former name that __post_init__ mirrors into the current one)
    _NOT_SERIALIZED: ClassVar[tuple[str, ...]] = ()
    # (field, value): options added after files were written without them, left out of to_dict while they hold that
    # value (their default, what such files mean), so that a config not using them writes the dict (and the hashes)
    # it always did, and older qvla_quant still read it
    _OMITTED_AT: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def to_dict(self, *, version: bool = True) -> dict:
        omitted = {name for name, value in self._OMITTED_AT if getattr(self, name) == value}
        kept = [f.name for f in fields(self) if f.name not in self._NOT_SERIALIZED and f.name not in omitted]
        out = {name: _plain(getattr(self, name), version) for name in kept}
        if version:
            out["version"] = self.VERSION
        return out

    @classmethod
    def from_dict(cls, d: dict):
        """The config `d` describes; nested configs and templates may be given as dicts (validated likewise)."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= cls.VERSION:
            raise ValueError(
                f"{cls.__name__}: version {version!r} is not one this qvla_quant reads (1 to {cls.VERSION}); "
                "it was written by a newer qvla_quant: upgrade it"
            )
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class WeightQuantConfig(Config):
    """How weight rows are quantized.

    clip_search: search a per-row shrink factor of the [min, max] range that minimizes the row's squared error.
    clip_grid: number of shrink factors tried, evenly spaced in [clip_min_ratio, 1].
    """

    clip_search: bool = True
    clip_grid: int = 20
    clip_min_ratio: float = 0.5

    def __post_init__(self):
        if self.clip_grid < 1:
            raise ValueError(f"WeightQuantConfig.clip_grid must be >= 1, got {self.clip_grid}")
        if not 0.0 < self.clip_min_ratio <= 1.0:
            raise ValueError(f"WeightQuantConfig.clip_min_ratio must be in (0, 1], got {self.clip_min_ratio}")


@dataclass(frozen=True)
class ActivationQuantConfig(Config):
    """One activation bit-width for every quantized layer (the paper's branch-free uniform activations).

    bits = 16: activations stay in floating point (A16). bits = 8: per-token dynamic asymmetric int8 (A8), the
    input of every quantized layer is fake-quantized per row of the flattened input (per token).
    """

    bits: int = 16

    def __post_init__(self):
        if self.bits not in ACTIVATION_BITS:
            raise ValueError(f"activation bits must be one of {ACTIVATION_BITS}, got {self.bits}")


@dataclass(frozen=True)
class QuantConfig(Config):
    """The weight quantizer and the activation bits: what a Plan records and the packed model computes with."""

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)

    def __post_init__(self):
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", WeightQuantConfig.from_dict(self.weight))
        if isinstance(self.activation, dict):
            object.__setattr__(self, "activation", ActivationQuantConfig.from_dict(self.activation))
        if not isinstance(self.weight, WeightQuantConfig) or not isinstance(self.activation, ActivationQuantConfig):
            raise ValueError("QuantConfig needs a WeightQuantConfig and an ActivationQuantConfig (or their dicts)")


@dataclass(frozen=True)
class AllocationConfig(Config):
    """How bits are allocated (`qvla_quant.allocation`).

    bits: candidate bit-widths per channel (16 always included). {2, 4, 8, 16}: no pruning.
    solver: "greedy" (the paper) or "lagrangian" (optimal: the Lagrangian sweep with an exact repair).
    max_pruned_fraction: the per-layer cap on pruned (non-dead) rows.
    prune_abs_threshold / prune_rel_threshold: the dual-threshold pruning guard (None: that test off);
        prune_threshold: the former name of prune_abs_threshold, still accepted (and mirrored; not written).
    prune_dead: rows whose weights and output gradients are all zero may be pruned whatever the cap.
    activation_bits: 16, or 8 for W*A8 plans.
    template: per-layer rules; None uses the one the sensitivity was calibrated with.
    groups: when the sensitivity was calibrated with a group size (`CalibrationConfig.group_size`), a row at a
        candidate width in GROUPED_BITS may also take its grouped variant (group-wise scales, their extra scales and
        zero points counted in the budget); False: per-row choices only. Without grouped columns it changes nothing.
    """

    _NOT_SERIALIZED: ClassVar[tuple[str, ...]] = ("prune_threshold",)
    _OMITTED_AT: ClassVar[tuple[tuple[str, Any], ...]] = (("groups", True),)

    bits: tuple[int, ...] = BIT_CHOICES
    solver: str = "greedy"
    max_pruned_fraction: float = 0.5
    prune_threshold: float | None = None
    prune_dead: bool = True
    activation_bits: int = 16
    template: PlanTemplate | None = None
    prune_abs_threshold: float | None = None
    prune_rel_threshold: float | None = None
    groups: bool = True

    def __post_init__(self):
        bits = tuple(sorted({int(b) for b in self.bits} | {KEEP_BITS}))
        bad = set(bits) - set(ROW_BITS)  # 3 and 6 on request: the default stays the paper's BIT_CHOICES
        if bad:
            raise ValueError(f"AllocationConfig.bits: {sorted(bad)} not in {ROW_BITS}")
        object.__setattr__(self, "bits", bits)
        if not isinstance(self.groups, bool):
            raise ValueError(f"AllocationConfig.groups must be True or False, got {self.groups!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"AllocationConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if not 0.0 <= self.max_pruned_fraction <= 1.0:
            raise ValueError(f"AllocationConfig.max_pruned_fraction must be in [0, 1], got {self.max_pruned_fraction}")
        old, new = self.prune_threshold, self.prune_abs_threshold
        if old is not None and new is not None and float(old) != float(new):
            raise ValueError(
                f"AllocationConfig: prune_threshold ({old}) is the former name of prune_abs_threshold ({new}); give one"
            )
        absolute = new if new is not None else old
        for name, value in (("prune_abs_threshold", absolute), ("prune_rel_threshold", self.prune_rel_threshold)):
            if value is not None and (isinstance(value, bool) or not float(value) >= 0 or math.isinf(value)):
                raise ValueError(f"AllocationConfig.{name} must be a finite number >= 0 or None, got {value}")
        absolute = None if absolute is None else float(absolute)
        object.__setattr__(self, "prune_abs_threshold", absolute)
        object.__setattr__(self, "prune_threshold", absolute)
        if self.prune_rel_threshold is not None:
            object.__setattr__(self, "prune_rel_threshold", float(self.prune_rel_threshold))
        ActivationQuantConfig(self.activation_bits)  # validates 8 / 16
        if isinstance(self.template, dict):
            object.__setattr__(self, "template", PlanTemplate.from_dict(self.template))

    def guard_text(self) -> str:
        """The pruning guards in words, for error messages."""
        return (
            f"max pruned fraction {self.max_pruned_fraction:g}, prune thresholds: absolute {self.prune_abs_threshold}, "
            f"relative to the layer median {self.prune_rel_threshold}"
        )


@dataclass(frozen=True)
class CalibrationConfig(Config):
    """How sensitivities are measured (`qvla_quant.sensitivity`).

    bits: bit-widths measured per channel (16 is always included, with s = 0).
    method: "two_stage" (proxy for all, exact for the top), "proxy" (proxy only) or "exact" (Eq. 4 for every
        channel and bit: the definition, and the slowest).
    proxy: which first-order estimate ranks channels ("aligned" or "gain", see the module docstring).
    exact_fraction: two_stage: fraction of all calibrated channels refined exactly, per bit-width (global top).
    rank_sample: random (channel, bit) pairs measured exactly to report the proxy/exact rank correlation.
    channels_per_pass: channels perturbed per forward pass of the exact computation (the batch is replicated that
        many times: memory grows with it).
    max_exact_dims: action chunks with at most this many dims (H * D) get one backward pass per dim (exact
        Jacobian); larger ones use `n_probes` random projections.
    proxy_group_weights: the proxy handles layers in groups of at most this many weights per forward/backward
        pass (each layer's quantization errors for every bit are held in memory during its group's pass).
    seed: random projections, the rank sample and the noise of batch i (seed + i).
    weight: the weight quantizer, identical to the one the plan will be packed with.
    template: which layers are calibrated (rule "auto"); fixed/skipped layers are not measured.
    store_dir: directory of the resumable on-disk store (None: in memory only).
    prefix_cache: exact passes over layers downstream of the adapter's observation prefix (π0: the action expert)
        reuse that prefix instead of recomputing it (the same numbers, bit for bit; False: recompute, for timing).
    group_size: None (the default: per-row scales only), or g in GROUP_SIZES: every calibrated width in
        GROUPED_BITS is also measured with group-wise scales (one scale and zero point per g weights along K), as
        extra columns ("2g", "4g", ...) the allocation may choose (`AllocationConfig.groups`).
    """

    _OMITTED_AT: ClassVar[tuple[tuple[str, Any], ...]] = (("group_size", None),)

    bits: tuple[int, ...] = BIT_CHOICES
    method: str = "two_stage"
    proxy: str = "aligned"
    exact_fraction: float = 0.05
    rank_sample: int = 64
    channels_per_pass: int = 16
    max_exact_dims: int = 64
    n_probes: int = 16
    proxy_group_weights: int = 50_000_000
    seed: int = 0
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    template: PlanTemplate = field(default_factory=PlanTemplate)
    store_dir: str | None = None
    progress: bool = True
    prefix_cache: bool = True
    group_size: int | None = None

    def __post_init__(self):
        bits = tuple(sorted({int(b) for b in self.bits} | {KEEP_BITS}))
        bad = set(bits) - set(ROW_BITS)  # 3 and 6 on request: the default stays the paper's BIT_CHOICES
        if bad:
            raise ValueError(f"CalibrationConfig.bits: {sorted(bad)} not in {ROW_BITS}")
        if len(bits) < 2:
            raise ValueError("CalibrationConfig.bits: give at least one bit-width below 16")
        object.__setattr__(self, "bits", bits)
        if self.method not in METHODS:
            raise ValueError(f"CalibrationConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.proxy not in PROXIES:
            raise ValueError(f"CalibrationConfig.proxy must be one of {PROXIES}, got {self.proxy!r}")
        if not 0.0 <= self.exact_fraction <= 1.0:
            raise ValueError(f"CalibrationConfig.exact_fraction must be in [0, 1], got {self.exact_fraction}")
        for name in ("channels_per_pass", "max_exact_dims", "n_probes", "proxy_group_weights"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibrationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.rank_sample < 0:
            raise ValueError(f"CalibrationConfig.rank_sample must be >= 0, got {self.rank_sample}")
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", WeightQuantConfig.from_dict(self.weight))
        if isinstance(self.template, dict):
            object.__setattr__(self, "template", PlanTemplate.from_dict(self.template))
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
                raise ValueError(f"CalibrationConfig.group_size must be one of {GROUP_SIZES} or None, "
                                 f"got {self.group_size!r}")  # fmt: skip
            if not self.grouped_bits:
                raise ValueError(
                    f"CalibrationConfig.group_size {self.group_size}: none of the calibrated bits {list(bits)} can "
                    f"have group-wise scales (only {list(GROUPED_BITS)}); add one of them or leave group_size out"
                )

    @property
    def quantized_bits(self) -> tuple[int, ...]:
        return tuple(b for b in self.bits if b != KEEP_BITS)

    @property
    def grouped_bits(self) -> tuple[int, ...]:
        """The widths also measured with group-wise scales: the calibrated ones in GROUPED_BITS (none without a
        group_size)."""
        return tuple(b for b in self.bits if b in GROUPED_BITS) if self.group_size is not None else ()

    def result_key(self) -> dict:
        """The settings that change the numbers (a store written with other ones cannot be resumed)."""
        d = self.to_dict(version=False)  # stores written before configs carried a version still resume
        for k in ("channels_per_pass", "proxy_group_weights", "store_dir", "progress", "prefix_cache"):
            d.pop(k)
        return d
