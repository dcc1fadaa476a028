"""The bit allocation plan: plain, inspectable, versioned data (one entry per quantizable layer, one bit-width per
output row). Produced by `allocate`, consumed by `quantize`, stored as JSON inside an artifact.

The average bit-width of a plan is weighted by row size: each row contributes `bits * fan_in` bits over
`fan_in` weights, so a row of a wide layer counts more than a row of a narrow one (the paper's "average
bit-width" is over weights). Only the layers in the plan (the quantized layers) count; layers kept at 16 by
role rules are in the plan with all rows at 16 only when they are candidates for quantization.

A row's bits are in `quantizer.ROW_BITS` (0, 2, 3, 4, 6, 8, 16). Group-wise scales: a layer may name one
`group_size` (64, 128 or 256 along K) and flag rows `grouped` (rows at 2, 3 or 4 bits); such a row counts
b * K + 40 * (ceil(K / g) - 1) bits (`quantizer.row_plan_bits`: its extra fp32 scales and uint8 zero points are in
the budget), every other row b * K. A layer without grouped rows has group_size = grouped = None (the one form
of it), and its dictionary is exactly what it was before groups existed (same keys, same plan hash).

Token embeddings (`Plan.embeddings`, optional): an nn.Embedding table named there is stored as a
`qvla_quant.packed_embedding.PackedEmbedding`, every row at one bit-width (`EmbeddingPlan.bits`: 2, 3, 4, 6 or 8
with a per-row fp32 scale and uint8 zero point, 16 kept in 16 bits, 0 = not stored at all, for a table the model
provably never reads, such as π0's action-expert copy). Embeddings are not in the average-bit budget (`average_bits`
covers the layers only, as before, so existing budgets mean what they meant); the artifact summary reports their
bytes separately.

Versions: `to_dict` writes plan format 1 when every layer uses the paper's vocabulary (per-row rows at
{0, 2, 4, 8, 16} bits), so older qvla_quant still read those plans, and format 2 when a layer has 3- or 6-bit
or grouped rows. Both are read. `embeddings` is an optional key that does not change the version: a plan without
embeddings has exactly the dictionary and hash it had before embeddings existed, and an older qvla_quant reading a
plan with embeddings ignores them (its tables stay float: larger, never wrong). Artifacts guard the other way: one
that holds packed tables is artifact format 3, which an older qvla_quant refuses (`qvla_quant.artifact`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from qvla_quant.config import QuantConfig
from qvla_quant.layers import LayerDesc
from qvla_quant.quantizer import BIT_CHOICES, ROW_BITS, RowChoice, check_granularity, check_grouped, row_plan_bits

PLAN_FORMAT_VERSION = 2  # what plans with 3/6-bit or grouped rows are written as (others: 1, see the docstring)
PLAN_READ_VERSIONS: tuple[int, ...] = (1, 2)
EMBEDDING_BITS: tuple[int, ...] = ROW_BITS  # 0 = not stored, 2..8 = per-row codes, 16 = kept


@dataclass
class LayerPlan(LayerDesc):
    """Bits for every output row of one layer.

    name: the module's qualified name in the policy; role: vision / projector / language / action / other;
    kind: "linear" or "conv"; out_features x fan_in: the weight as rows; bits: one entry per row.
    granularity: "row" (per-row scale/zero, the method) or "tensor" (one scale/zero shared by all rows: the
    layer-wise RTN baseline; its quantized rows must share one bit-width). See `qvla_quant.quantizer`.
    group_size / grouped: group-wise scales (g along K) for the rows flagged True (at 2, 3 or 4 bits); None / None
    when no row is grouped (given flags that are all False are normalized to that).
    """

    bits: list[int]
    granularity: str = "row"
    group_size: int | None = None
    grouped: list[bool] | None = None

    def __post_init__(self):
        if len(self.bits) != self.out_features:
            raise ValueError(f"{self.name}: {len(self.bits)} row bit-widths for {self.out_features} rows")
        bad = set(self.bits) - set(ROW_BITS)
        if bad:
            raise ValueError(f"{self.name}: bit-widths {sorted(bad)} not in {ROW_BITS}")
        self.bits = [int(b) for b in self.bits]
        try:
            check_granularity(self.granularity, self.bits)
            if self.grouped is not None and len(self.grouped) != self.out_features:
                raise ValueError(f"{len(self.grouped)} grouped flags for {self.out_features} rows")
            flags, self.group_size = check_grouped(
                self.bits, None if self.grouped is None else list(self.grouped), self.group_size, self.granularity
            )
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        self.grouped = None if flags is None else [bool(f) for f in flags.tolist()]

    @property
    def total_bits(self) -> int:
        """Bits the plan counts for this layer: b * K per row, plus a grouped row's extra scales and zero points."""
        total = sum(self.bits) * self.fan_in
        if self.grouped is not None:
            extra = row_plan_bits(self.fan_in, 2, grouped=True, group_size=self.group_size) - 2 * self.fan_in
            total += extra * sum(self.grouped)
        return total

    def bits_tensor(self) -> torch.Tensor:
        return torch.tensor(self.bits, dtype=torch.long)

    def grouped_tensor(self) -> torch.Tensor:
        """Per-row grouped flags (bool [out]; all False without grouped rows)."""
        return torch.tensor(self.grouped or [False] * self.out_features, dtype=torch.bool)

    def row_choices(self) -> list[RowChoice]:
        """Every row's (bits, grouped)."""
        flags = self.grouped or [False] * self.out_features
        return [RowChoice(b, g) for b, g in zip(self.bits, flags)]

    @property
    def uses_new_format(self) -> bool:
        """Whether this layer needs plan format 2 (3/6-bit or grouped rows)."""
        return self.grouped is not None or bool(set(self.bits) - set(BIT_CHOICES))

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "role": self.role,
            "kind": self.kind,
            "out_features": self.out_features,
            "fan_in": self.fan_in,
            "bits": self.bits,
            "granularity": self.granularity,
        }
        if self.grouped is not None:  # only then: ungrouped layers keep their old dictionary (and plan hash)
            d["group_size"] = self.group_size
            d["grouped"] = list(self.grouped)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerPlan:
        grouped = d.get("grouped")
        return cls(
            d["name"],
            d["role"],
            d["kind"],
            int(d["out_features"]),
            int(d["fan_in"]),
            list(d["bits"]),
            d.get("granularity", "row"),  # plans written before the layer-wise baseline existed are per-row
            None if d.get("group_size") is None else int(d["group_size"]),
            None if grouped is None else list(grouped),
        )


@dataclass
class EmbeddingPlan:
    """One token-embedding table stored as a `PackedEmbedding`: `num_embeddings` rows of `embedding_dim` values,
    every row at `bits` (see the module docstring; 0 = the table is not stored). `role` as for layers (reporting).
    """

    name: str
    role: str
    num_embeddings: int
    embedding_dim: int
    bits: int

    def __post_init__(self):
        if isinstance(self.bits, bool) or int(self.bits) not in EMBEDDING_BITS:
            raise ValueError(f"embedding {self.name!r}: bits must be one of {EMBEDDING_BITS}, got {self.bits!r}")
        self.bits = int(self.bits)
        self.num_embeddings, self.embedding_dim = int(self.num_embeddings), int(self.embedding_dim)
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise ValueError(f"embedding {self.name!r}: {self.num_embeddings} x {self.embedding_dim} is not a table")

    @property
    def n_weights(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "bits": self.bits}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddingPlan:
        return cls(d["name"], d["role"], int(d["num_embeddings"]), int(d["embedding_dim"]), int(d["bits"]))


@dataclass
class Plan:
    """A whole policy's allocation: layers, quantizer settings, the budget it was solved for, and the
    fingerprint of the source model it belongs to; `embeddings`: token-embedding tables stored packed (optional,
    outside the budget; see the module docstring)."""

    layers: dict[str, LayerPlan]
    quant: QuantConfig = field(default_factory=QuantConfig)
    budget: float | None = None
    model_fingerprint: str = ""
    method: str = "qvla"
    info: dict = field(default_factory=dict)
    format_version: int = PLAN_FORMAT_VERSION
    embeddings: dict[str, EmbeddingPlan] = field(default_factory=dict)

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
        """Number of weights (not rows) at each bit-width of ROW_BITS (grouped rows under their bits)."""
        hist = {b: 0 for b in ROW_BITS}
        for lp in self.layers.values():
            if role is None or lp.role == role:
                for b in lp.bits:
                    hist[b] += lp.fan_in
        return hist

    def grouped_fraction(self, role: str | None = None) -> float:
        """Fraction of the rows stored with group-wise scales."""
        layers = [lp for lp in self.layers.values() if role is None or lp.role == role]
        rows = sum(lp.out_features for lp in layers)
        return sum(sum(lp.grouped or []) for lp in layers) / rows if rows else 0.0

    def required_format_version(self) -> int:
        """The oldest plan format that expresses this plan: 1, or 2 with 3/6-bit or grouped rows (embeddings are an
        optional key of either, see the module docstring)."""
        return 2 if any(lp.uses_new_format for lp in self.layers.values()) else 1

    def hash(self) -> str:
        """Stable hash of what determines the quantized weights (bits, quantizer settings, source model)."""
        content = {
            "layers": {k: v.to_dict() for k, v in sorted(self.layers.items())},
            "quant": self.quant.to_dict(version=False),  # the hashes of plans written before configs had one
            "model": self.model_fingerprint,
        }
        if self.embeddings:  # only then: plans without embeddings keep the hash they always had
            content["embeddings"] = {k: v.to_dict() for k, v in sorted(self.embeddings.items())}
        payload = json.dumps(content, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ---- JSON
    def to_dict(self) -> dict:
        d = {
            "format_version": self.required_format_version(),
            "method": self.method,
            "budget": self.budget,
            "model_fingerprint": self.model_fingerprint,
            "quant": self.quant.to_dict(),
            "info": self.info,
            "average_bits": self.average_bits(),
            "plan_hash": self.hash(),
            "layers": [lp.to_dict() for lp in self.layers.values()],
        }
        if self.embeddings:
            d["embeddings"] = [e.to_dict() for e in self.embeddings.values()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        version = d.get("format_version")
        if version not in PLAN_READ_VERSIONS:
            raise ValueError(
                f"plan format version {version!r} is not supported by this qvla_quant "
                f"(reads {', '.join(map(str, PLAN_READ_VERSIONS))}); re-run the allocation with this version"
            )
        layers = [LayerPlan.from_dict(x) for x in d["layers"]]
        embeddings = [EmbeddingPlan.from_dict(x) for x in d.get("embeddings", [])]
        overlap = sorted({e.name for e in embeddings} & {lp.name for lp in layers})
        if overlap:
            raise ValueError(f"plan names {overlap} both as a layer and as an embedding")
        return cls(
            layers={lp.name: lp for lp in layers},
            quant=QuantConfig.from_dict(d["quant"]),
            budget=d.get("budget"),
            model_fingerprint=d.get("model_fingerprint", ""),
            method=d.get("method", "qvla"),
            info=d.get("info", {}),
            format_version=version,
            embeddings={e.name: e for e in embeddings},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))
