"""Policy adapters: the quantizer's one view of any policy (see `base.PolicyAdapter`), and a registry by name."""

from __future__ import annotations

from pathlib import Path

from qvla_quant.adapters.base import LayerInfo, PolicyAdapter
from qvla_quant.adapters.generic import GenericAdapter
from qvla_quant.adapters.pi0 import Pi0Adapter

ADAPTERS: dict[str, type[PolicyAdapter]] = {cls.name: cls for cls in (Pi0Adapter, GenericAdapter)}


def adapter_class(name: str) -> type[PolicyAdapter]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown policy adapter {name!r}; known: {sorted(ADAPTERS)}") from None


def load_policy(path, **kwargs) -> PolicyAdapter:
    """Load a policy from a local directory: a qvla_quant artifact (artifact.json, loaded with `qvla_quant.load`) or
    a float checkpoint, with the adapter that recognizes its files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"policy checkpoint {str(path)!r} does not exist")
    if (path / "artifact.json").is_file():
        from qvla_quant.api import load  # the api imports this package

        return load(path, **kwargs)
    for cls in ADAPTERS.values():
        if cls.can_load(path):
            return cls.from_pretrained(path, **kwargs)
    raise ValueError(
        f"no adapter recognizes the checkpoint at {str(path)!r} (known: {sorted(ADAPTERS)}); "
        "a π0 checkpoint is a directory with config.json (model_type 'pi0') and safetensors weights"
    )


def adapter_from_config(config: dict, **kwargs) -> PolicyAdapter:
    """Rebuild an adapter around a model skeleton from `PolicyAdapter.config_dict()` output."""
    if not isinstance(config, dict) or "adapter" not in config:
        raise ValueError("adapter config must be a dict with an 'adapter' key (from PolicyAdapter.config_dict())")
    return adapter_class(config["adapter"]).from_config(config, **kwargs)


__all__ = [
    "ADAPTERS",
    "GenericAdapter",
    "LayerInfo",
    "Pi0Adapter",
    "PolicyAdapter",
    "adapter_class",
    "adapter_from_config",
    "load_policy",
]
