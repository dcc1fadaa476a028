"""Any nn.Module as a policy: the user supplies `actions_fn(model, batch, noise) -> [B, H, D]` and name -> role rules.

Used for small test policies and as the template for new policy families. A generic model cannot be rebuilt from
JSON (its class is arbitrary code), so `from_config` needs the caller to hand over the model skeleton and the
action function; nothing is imported by name from a stored config (that would run arbitrary code on load).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qvla_quant.adapters.base import Batch, PolicyAdapter

ActionsFn = Callable[[nn.Module, Batch, "torch.Tensor | None"], torch.Tensor]


class GenericAdapter(PolicyAdapter):
    """noise_shape: (H, D_noise) of the initial noise for noise-driven policies, None for deterministic ones."""

    name = "generic"

    def __init__(
        self,
        model: nn.Module,
        actions_fn: ActionsFn,
        *,
        role_rules: dict[str, str] | None = None,
        noise_shape: tuple[int, int] | None = None,
        noise_seed: int = 0,
        dead: list[str] | None = None,
    ):
        super().__init__(model, noise_seed=noise_seed)
        if not callable(actions_fn):
            raise TypeError(f"actions_fn must be callable as actions_fn(model, batch, noise), got {actions_fn!r}")
        self.actions_fn = actions_fn
        self.role_rules = dict(role_rules or {})
        self.noise_shape = tuple(noise_shape) if noise_shape is not None else None
        self._dead = list(dead or [])
        for info in self.layers():  # fail now on a rule that names an unknown role
            self.role_of(info.name)

    def known_dead_layers(self) -> list[str]:
        return list(self._dead)

    def actions(self, batch: Batch, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.actions_fn(self.model, self.to_device(batch), None if noise is None else noise.to(self.device))
        if out.dim() != 3:
            raise ValueError(f"actions_fn must return [batch, horizon, action_dim], got shape {tuple(out.shape)}")
        return out

    def make_noise(self, batch_size: int, seed: int) -> torch.Tensor | None:
        if self.noise_shape is None:
            return None
        # drawn on the CPU so that the same seed gives the same noise on every device
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randn(batch_size, *self.noise_shape, generator=gen).to(self.device)

    def config_dict(self) -> dict:
        return {
            "adapter": self.name,
            "role_rules": dict(self.role_rules),
            "noise_shape": list(self.noise_shape) if self.noise_shape is not None else None,
            "noise_seed": self.noise_seed,
            "dead": list(self._dead),
        }

    @classmethod
    def from_config(
        cls, config: dict, *, model: nn.Module | None = None, actions_fn: ActionsFn | None = None, **_
    ) -> GenericAdapter:
        if model is None or actions_fn is None:
            raise ValueError(
                "a generic policy cannot be rebuilt from its stored config: pass the model skeleton and its "
                "actions function (load(path, model=..., actions_fn=...))"
            )
        noise_shape = config.get("noise_shape")
        return cls(
            model,
            actions_fn,
            role_rules=config.get("role_rules"),
            noise_shape=tuple(noise_shape) if noise_shape else None,
            noise_seed=config.get("noise_seed", 0),
            dead=config.get("dead"),
        )
