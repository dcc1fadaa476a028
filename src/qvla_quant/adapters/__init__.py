"""Policy adapters: the quantizer's one view of any policy (see `base.PolicyAdapter`), and a registry by name."""

from __future__ import annotations

from qvla_quant.adapters.base import LayerInfo, PolicyAdapter
from qvla_quant.adapters.generic import GenericAdapter
from qvla_quant.adapters.pi0 import Pi0Adapter

ADAPTERS: dict[str, type[PolicyAdapter]] = {cls.name: cls for cls in (Pi0Adapter, GenericAdapter)}


def adapter_class(name: str) -> type[PolicyAdapter]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown policy adapter {name!r}; known: {sorted(ADAPTERS)}") from None


__all__ = [
    "ADAPTERS",
    "GenericAdapter",
    "LayerInfo",
    "Pi0Adapter",
    "PolicyAdapter",
    "adapter_class",
]
