"""The bit allocation plan: plain, inspectable, versioned data (one entry per quantizable layer, one bit-width per
output row). Produced by `allocate`, consumed by `quantize`, stored as JSON inside an artifact.

The average bit-width of a plan is weighted by row size: each row contributes `bits * fan_in` bits over
`fan_in` weights, so a row of a wide layer counts more than a row of a narrow one (the paper's "average
bit-width" is over weights). Only the layers in the plan (the quantized layers) count; layers kept at 16 by
role rules are in the plan with all rows at 16 only when they are candidates for quantization.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from qvla_quant.quantizer import BIT_CHOICES, QuantConfig, check_granularity

PLAN_FORMAT_VERSION = 1


@dataclass
class LayerPlan:
    """Bits for every output row of one layer.

    name: the module's qualified name in the policy; role: vision / projector / language / action / other;
    kind: "linear" or "conv"; out_features x fan_in: the weight as rows; bits: one entry per row.
    granularity: "row" (per-row scale/zero, the method) or "tensor" (one scale/zero shared by all rows: the
    layer-wise RTN baseline; its quantized rows must share one bit-width). See `qvla_quant.quantizer`.
    """

    name: str
    role: str
    kind: str
    out_features: int
    fan_in: int
    bits: list[int]
    granularity: str = "row"

    def __post_init__(self):
        if len(self.bits) != self.out_features:
            raise ValueError(f"{self.name}: {len(self.bits)} row bit-widths for {self.out_features} rows")
        bad = set(self.bits) - set(BIT_CHOICES)
        if bad:
            raise ValueError(f"{self.name}: bit-widths {sorted(bad)} not in {BIT_CHOICES}")
        self.bits = [int(b) for b in self.bits]
        try:
            check_granularity(self.granularity, self.bits)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    @property
    def n_weights(self) -> int:
        return self.out_features * self.fan_in

    @property
    def total_bits(self) -> int:
        return sum(self.bits) * self.fan_in

    def bits_tensor(self) -> torch.Tensor:
        return torch.tensor(self.bits, dtype=torch.long)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "kind": self.kind,
            "out_features": self.out_features,
            "fan_in": self.fan_in,
            "bits": self.bits,
            "granularity": self.granularity,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerPlan:
        return cls(
            d["name"],
            d["role"],
            d["kind"],
            int(d["out_features"]),
            int(d["fan_in"]),
            list(d["bits"]),
            d.get("granularity", "row"),  # plans written before the layer-wise baseline existed are per-row
        )


@dataclass
class Plan:
    """A whole policy's allocation: layers, quantizer settings, the budget it was solved for, and the
    fingerprint of the source model it belongs to."""

    layers: dict[str, LayerPlan]
    quant: QuantConfig = field(default_factory=QuantConfig)
    budget: float | None = None
    model_fingerprint: str = ""
    method: str = "qvla"
    info: dict = field(default_factory=dict)
    format_version: int = PLAN_FORMAT_VERSION

    # ---- summaries
    def average_bits(self, role: str | None = None) -> float:
        layers = [lp for lp in self.layers.values() if role is None or lp.role == role]
        n = sum(lp.n_weights for lp in layers)
        return sum(lp.total_bits for lp in layers) / n if n else float("nan")

    def pruned_fraction(self, role: str | None = None) -> float:
        layers = [lp for lp in self.layers.values() if role is None or lp.role == role]
        rows = sum(lp.out_features for lp in layers)
        return sum(b == 0 for lp in layers for b in lp.bits) / rows if rows else 0.0

    def roles(self) -> list[str]:
        return sorted({lp.role for lp in self.layers.values()})

    def bit_histogram(self, role: str | None = None) -> dict[int, int]:
        """Number of weights (not rows) at each bit-width."""
        hist = {b: 0 for b in BIT_CHOICES}
        for lp in self.layers.values():
            if role is None or lp.role == role:
                for b in lp.bits:
                    hist[b] += lp.fan_in
        return hist

    def hash(self) -> str:
        """Stable hash of what determines the quantized weights (bits, quantizer settings, source model)."""
        payload = json.dumps(
            {
                "layers": {k: v.to_dict() for k, v in sorted(self.layers.items())},
                "quant": self.quant.to_dict(),
                "model": self.model_fingerprint,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ---- JSON
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "method": self.method,
            "budget": self.budget,
            "model_fingerprint": self.model_fingerprint,
            "quant": self.quant.to_dict(),
            "info": self.info,
            "average_bits": self.average_bits(),
            "plan_hash": self.hash(),
            "layers": [lp.to_dict() for lp in self.layers.values()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        version = d.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"plan format version {version!r} is not supported by this qvla_quant "
                f"(expects {PLAN_FORMAT_VERSION}); re-run the allocation with this version"
            )
        layers = [LayerPlan.from_dict(x) for x in d["layers"]]
        return cls(
            layers={lp.name: lp for lp in layers},
            quant=QuantConfig.from_dict(d["quant"]),
            budget=d.get("budget"),
            model_fingerprint=d.get("model_fingerprint", ""),
            method=d.get("method", "qvla"),
            info=d.get("info", {}),
            format_version=version,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))
