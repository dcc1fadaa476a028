"""What a quantizable layer is, seen as rows: the one layer description every part of qvla_quant shares.

A layer is `out_features` output rows of `fan_in` weights each (a conv filter [in/groups, *kernel] is one row),
with a `role` (vision / projector / language / action / action_head / other: `qvla_quant.roles`) and a `kind`
("linear" or "conv"). The adapters report layers (`LayerInfo` adds the module), calibration measures them
(`LayerSensitivity` adds the measurements), allocation plans them (`LayerPlan` adds bits per row): each of those
*is* a `LayerDesc` with more fields, so code that only needs the shape takes a `LayerDesc` and accepts any of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("linear", "conv")
DESC_KEYS: tuple[str, ...] = ("role", "kind", "out_features", "fan_in")  # what `to_dict` writes (name is the key)


@dataclass
class LayerDesc:
    """A quantizable layer: name, role, kind and its weight as out_features rows x fan_in."""

    name: str
    role: str
    kind: str  # "linear" | "conv"
    out_features: int
    fan_in: int

    @property
    def n_weights(self) -> int:
        return self.out_features * self.fan_in

    def desc(self) -> LayerDesc:
        """The description alone (a plain LayerDesc, whatever subclass this is)."""
        return LayerDesc(self.name, self.role, self.kind, self.out_features, self.fan_in)

    def desc_dict(self) -> dict:
        """{role, kind, out_features, fan_in}: how files that key layers by name store the description."""
        return {k: getattr(self, k) for k in DESC_KEYS}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> LayerDesc:
        """The layer `name` from a `desc_dict` (other keys of `d` are ignored: records carry more)."""
        missing = [k for k in DESC_KEYS if k not in d]
        if missing:
            raise ValueError(f"layer {name!r}: its description lacks {missing}")
        return LayerDesc(str(name), str(d["role"]), str(d["kind"]), int(d["out_features"]), int(d["fan_in"]))


def layer_descs(layers: Iterable[LayerDesc]) -> list[LayerDesc]:
    """Plain descriptions of `layers`, checked: at least one, names unique."""
    descs = []
    for item in layers:
        if not isinstance(item, LayerDesc):
            raise ValueError(f"expected layer descriptions (LayerDesc, LayerPlan, LayerInfo, ...), got {item!r}")
        descs.append(item.desc())
    names = [d.name for d in descs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"layer names must be unique; repeated: {duplicates}")
    if not descs:
        raise ValueError("no layer given: nothing to quantize")
    return descs
