"""The quantizer's one view of a policy: its quantizable layers with roles, a differentiable action function, and a
deployment `predict`.

Conventions every adapter keeps (sensitivity relies on them):
- A batch is a dict of tensors whose first dimension is the batch (sample) dimension. `repeat_batch(batch, k)`
  concatenates k copies along that dimension, so replica i holds rows [i*B, (i+1)*B).
- Inside the model, every quantizable layer's input and output keep the samples in the leading dimension in that
  same block order (e.g. [B * cameras, ...] after a flatten(0, 1) is fine, a [tokens, B, ...] layout is not).
  Exact sensitivity adds a different channel error to each replica block, and checks divisibility.
- Samples are independent (eval mode: no batch statistics), so per-sample Jacobians can be read from one
  backward pass over the whole batch.
- `actions(batch, noise)` returns the continuous action chunk [B, H, D] and runs in the caller's grad mode
  (differentiable when grad is enabled). Flow-matching/diffusion policies take their initial noise from `noise`
  ([B, H, D_model], from `make_noise`), so the action is a deterministic function of the batch and the seed.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qvla_quant.layers import LayerDesc
from qvla_quant.roles import ROLES, NameRules

# What the packed runtime can replace: plain nn.Linear / nn.Conv2d (a subclass with its own forward computes
# something else and is left alone, as `qvla_quant.transforms.planned_modules` requires).
QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)


def is_quantizable(module: nn.Module) -> bool:
    return any(isinstance(module, t) and type(module).forward is t.forward for t in QUANTIZABLE_TYPES)


Batch = dict[str, torch.Tensor]


@dataclass
class LayerInfo(LayerDesc):
    """One quantizable layer of a live policy: its description (`qvla_quant.layers.LayerDesc`) and its module."""

    module: nn.Module = field(repr=False, compare=False)


def layer_kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv"


@contextlib.contextmanager
def output_gradients(model: nn.Module, layers: Sequence[LayerInfo], make_grad_hook):
    """Within the block, every call of every listed layer runs `make_grad_hook(info, input, output)` at forward
    time; when it returns a callable, a backward pass from the actions calls it with that call's output gradient.

    Parameters are frozen for the duration (requires_grad off, restored after) and each layer output gets a
    zero-valued scalar leaf added, so autograd tracks activations only: no weight gradients are computed or
    stored (less backward work, no gradient memory), yet every layer output is in the graph. Adding an exact 0.0
    leaves the forward values unchanged. Hooks are removed and flags restored whatever happens.
    """
    zero = torch.zeros((), requires_grad=True)
    handles = []
    flags: list[tuple[torch.Tensor, bool]] = []

    def forward_hook(info):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            on_grad = make_grad_hook(info, args[0], output)
            out = output + zero.to(device=output.device, dtype=output.dtype)
            if on_grad is not None:
                out.register_hook(on_grad)
            return out

        return hook

    try:
        for p in model.parameters():
            flags.append((p, p.requires_grad))
            p.requires_grad_(False)
        for info in layers:
            handles.append(info.module.register_forward_hook(forward_hook(info)))
        with torch.enable_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


class PolicyAdapter(abc.ABC):
    """Base class; subclasses set `name` (the registry key) and implement the abstract methods."""

    name: str = ""
    #: pattern -> role rules (exact names or "re:" regexes, precedence as in `qvla_quant.roles`)
    role_rules: dict[str, str] = {}

    def __init__(self, model: nn.Module, *, noise_seed: int = 0):
        self.model = model
        self.noise_seed = int(noise_seed)

    # ---- the module tree
    def role_of(self, name: str) -> str:
        role = NameRules(self.role_rules).resolve(name, "other")
        if role not in ROLES:
            raise ValueError(f"{type(self).__name__}: role rule for {name!r} gives unknown role {role!r}")
        return role

    def layers(self) -> list[LayerInfo]:
        """Every linear/conv layer whose forward is called as a module (so that hooks see it), in module order.

        Layers whose weight is shared with another listed layer are listed once (the first name): a shared
        weight has one quantization.
        """
        out, seen = [], set()
        excluded = self.excluded_layers()
        for name, module in self.model.named_modules():
            if not is_quantizable(module) or name in excluded:
                continue
            key = module.weight.data_ptr() if module.weight.device.type != "meta" else id(module.weight)
            if key in seen:
                continue
            seen.add(key)
            w = module.weight
            out.append(LayerInfo(name, self.role_of(name), layer_kind(module), w.shape[0], w[0].numel(), module))
        return out

    def excluded_layers(self) -> set[str]:
        """Linear/conv modules that are never called as modules (e.g. `nn.MultiheadAttention.out_proj`, which
        MultiheadAttention reads as a weight): hooks cannot see them, so they are not quantizable here."""
        return {f"{n}.out_proj" for n, m in self.model.named_modules() if isinstance(m, nn.MultiheadAttention)}

    def known_dead_layers(self) -> list[str]:
        """Layers that, by the architecture, can never influence the action (reported, never an error)."""
        return []

    def embedding_plans(self, bits: int | None = 8) -> dict:
        """`Plan.embeddings` entries (name -> `qvla_quant.plan.EmbeddingPlan`): the policy's token tables at `bits`
        and the tables it never reads at 0 (not stored). Only an adapter that knows which tables its policy reads
        can say (π0's does); this one cannot."""
        raise ValueError(
            f"{type(self).__name__} does not know which token-embedding tables its policy reads, so it cannot plan "
            "them: leave out --embedding-bits (the tables stay float), or give Plan.embeddings explicitly "
            "(qvla_quant.packed_embedding.embedding_plans)"
        )

    # ---- the action function
    @abc.abstractmethod
    def actions(self, batch: Batch, noise: torch.Tensor | None) -> torch.Tensor:
        """Continuous action chunk [B, H, D]; differentiable in the caller's grad mode."""

    @abc.abstractmethod
    def make_noise(self, batch_size: int, seed: int) -> torch.Tensor | None:
        """The fixed initial noise for `batch_size` samples (None for policies without noise)."""

    # ---- an observation prefix computed once (optional; exact sensitivity of the layers downstream of it)
    def downstream_of_prefix(self, name: str) -> bool:
        """Whether layer `name` runs only after the prefix that `prefix_cache` holds, so that perturbing it leaves
        that prefix unchanged (π0: the action expert and its heads, which read the VLM's KV cache). Default: no
        layer (no prefix)."""
        return False

    def prefix_cache(self, batch: Batch):
        """What `actions` computes from the observation alone before any downstream layer runs (π0: the VLM's KV
        cache of the images and text), computed with the current weights, for reuse by `actions_from_prefix` on the
        same batch; None when the adapter has no such prefix (the default; `actions_from_prefix` then recomputes).
        Runs in the caller's grad mode; callers use it under no_grad."""
        return None

    def actions_from_prefix(self, prefix, batch: Batch, noise: torch.Tensor | None) -> torch.Tensor:
        """`actions(batch, noise)` reusing `prefix` (from `prefix_cache(batch)`; never modified, so it can be reused
        for any number of calls): the same numbers as `actions`, without recomputing the prefix. Only valid while
        the layers upstream of the prefix are unchanged. Default (and prefix None): `actions(batch, noise)`."""
        return self.actions(batch, noise)

    def predict(self, batch: Batch) -> torch.Tensor:
        """Deployment path: no grad, the adapter's fixed seeded noise."""
        with torch.no_grad():
            return self.actions(batch, self.make_noise(self.batch_size(batch), self.noise_seed))

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The policy's float dtype (what its inputs and noise are cast to): its first floating parameter's."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def check_batch(self, batch: Batch) -> None:
        """Raise ValueError naming what is wrong with a model-input batch (an adapter that knows its inputs checks
        them here; the default only asks for a dict)."""
        if not isinstance(batch, dict):
            raise ValueError(f"a model-input batch must be a dict of tensors, got {type(batch).__name__}")

    def to_device(self, batch: Batch) -> Batch:
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- batches (first dimension = samples)
    def batch_size(self, batch: Batch) -> int:
        sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not sizes:
            raise ValueError("batch has no tensors: expected a dict of tensors with the samples in dimension 0")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch tensors disagree on the batch size (dimension 0): {sizes}")
        return next(iter(sizes.values()))

    def split_batch(self, batch: Batch, size: int) -> list[Batch]:
        n = self.batch_size(batch)
        return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]

    def concat_batches(self, batches: Sequence[Batch]) -> Batch:
        keys = set(batches[0])
        for b in batches[1:]:
            if set(b) != keys:
                raise ValueError(f"cannot concatenate batches with different keys: {sorted(keys)} vs {sorted(b)}")
        return {k: torch.cat([b[k] for b in batches], dim=0) for k in batches[0]}

    def repeat_batch(self, batch: Batch, k: int) -> Batch:
        """k copies in block order: replica i is rows [i*B, (i+1)*B)."""
        return {key: torch.cat([v] * k, dim=0) for key, v in batch.items()}

    # ---- dead layers
    def dead_layers(self, batch: Batch, *, seed: int = 0) -> list[str]:
        """Layers that cannot influence the action on this batch: the architecture's known ones plus every layer
        whose output gradient never arrives or is exactly zero under a random (Rademacher) probe of the action.

        With a random probe, a zero gradient means the Jacobian is zero on this batch (not just orthogonal to one
        direction) with probability one.
        """
        layers = self.layers()
        alive: dict[str, bool] = {info.name: False for info in layers}

        def make_grad_hook(info, x, output):
            def on_grad(grad):
                alive[info.name] = alive[info.name] or bool(grad.ne(0).any())

            return on_grad

        batch = self.to_device(batch)
        noise = self.make_noise(self.batch_size(batch), self.noise_seed)
        with output_gradients(self.model, layers, make_grad_hook):
            actions = self.actions(batch, noise)
            gen = torch.Generator().manual_seed(seed)
            probe = (torch.randint(0, 2, actions.shape, generator=gen) * 2 - 1).to(actions)
            torch.autograd.backward(actions, probe)
        dead = set(self.known_dead_layers()) | {name for name, ok in alive.items() if not ok}
        return [info.name for info in layers if info.name in dead]

    # ---- rebuilding
    @abc.abstractmethod
    def config_dict(self) -> dict:
        """JSON-able description from which `from_config` rebuilds the model skeleton and this adapter."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict, **kwargs) -> PolicyAdapter:
        """An adapter around a model skeleton (architecture only; weights come from an artifact)."""

    @classmethod
    def can_load(cls, path) -> bool:
        """Whether `path` (a local checkpoint directory) holds a policy this adapter loads."""
        return False

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> PolicyAdapter:
        raise NotImplementedError(f"{cls.__name__} cannot load checkpoints from a directory")
