"""The LLM-derived baselines the paper compares against, in the same harness and packed format as QVLA.

    res = awq(adapter, batches, 4)             activation-aware per-channel scaling + RTN rows (W4A16 / W8A16)
    res = gptq(adapter, batches, 4)            Hessian-based error compensation (W8/W4/W3/W2, per-row or grouped)
    res = smoothquant(adapter, batches, 8)     activation outliers migrated into the weights, W8A8
    res = module_wise(adapter, {"vision": 4, "language": 8, "action": 8})   bits per module role, RTN rows
    res = rtn(adapter, 4)                      plain per-channel RTN (`baselines.uniform_plan`)
    res.save("artifact/")                      packed artifact: `qvla_quant.load` / PolicyRuntime load it

Each returns a `BaselineResult(plan, adapter, qparams)`: the Plan (every row of the planned layers at the method's
bit-width; `plan.info` records the method, its settings and what it did per layer), an adapter around a transformed
COPY of the float model (the caller's model is never changed), and, for GPTQ, the explicit per-row scale/zero that
packing must use. `res.quantize()` packs the copy in place; `res.save(path)` writes the artifact (packing a copy).
The planned layers are those of a `PlanTemplate` (default: the paper's, vision + language + action expert; projector
and action head stay in the source dtype), the same set the RTN and QVLA rows of the benchmarks quantize. All
methods calibrate on the same batches, running `adapter.actions(batch, noise)` with the adapter's fixed noise, and
read each layer's inputs with forward pre-hooks (every call: the action expert's layers once per denoising step).

Input groups and folding (AWQ, SmoothQuant). Both rescale input channel j of a layer by s_j (W[:, j] * s_j) and
divide the layer's input by s_j, which must cost nothing at run time: 1/s is folded into the op that produces the
input, when that op is per-channel affine (`InputGroup`):
  - LayerNorm (SigLIP layer_norm1/2, post_layernorm): weight / s, bias / s;
  - Gemma RMSNorm, which multiplies by (1 + weight): weight <- (1 + weight) / s - 1; an RMSNorm multiplying by
    weight: weight / s (the norm's forward is checked numerically before anything is folded);
  - the previous Linear's output rows, weight[j, :] / s_j and bias[j] / s_j: SigLIP v_proj -> out_proj, and
    up_proj -> down_proj of a gated MLP (down(act(gate(x)) * up(x)) is linear in up's output).
Every layer reading that input shares one s (q/k/v; gate/up). Layers whose input no such op produces keep s = 1
(the patch embedding reads the image, fc2 follows a GELU, ...), and in π0 the language model's and the action
expert's o_proj do too: the expert attends over the language model's cached values next to its own, so neither
v_proj can be rescaled alone. `plan.info["layers"]` names the reason for every layer left at s = 1. After folding,
the float copy is checked against the original on a calibration batch (actions equal within fp32 rounding).

AWQ: s = mean_t |x_tj|^alpha (normalized), alpha on a grid in [0, 1] (alpha = 0 is plain RTN), chosen per input
group to minimize sum over its quantized layers of ||Q(W diag(s)) diag(s)^-1 x - W x||^2 over the calibration
tokens, computed exactly as sum_rows dW H dW^T with H = X^T X / N, so only K x K statistics are kept. The weight
quantizer is the packer's (per-row min-max, `plan.quant.weight`), so the packed rows are those AWQ scored.
GPTQ: H = 2 X^T X / N + damp * mean(diag) * I; columns quantized left to right with the upper Cholesky factor of
H^-1, each column's error propagated to the columns after it, lazily in blocks of 128 columns. Each row's scale and
zero point come from its original weights (min-max, or the clip search of `weight`) before compensation; since the
compensated row need not reach its min and max, the packer would not recompute them: they are passed to it
explicitly (`quantize_model(..., qparams=...)`), so the packed codes are exactly GPTQ's. Layers sharing an input
share one H; with `sequential=True` (default) each group's H is measured with all earlier groups already quantized
(one calibration pass per group), and H lives only while its group is processed.
SmoothQuant: s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha) (alpha 0.5), folded as above, then W8 rows and the
runtime's A8 activations (per-token dynamic int8 on every planned layer's input).
Module-wise: one bit-width per role ("as in industrial practice": vision 4 bits, language and action 8), RTN rows.

GPTQ grouped (`group_size` g in quantizer.GROUP_SIZES, rows at quantizer.GROUPED_BITS) uses the packed format's
group-wise scales: each group's scale/zero from its columns as compensated when GPTQ reaches the group, also passed
explicitly. W3 uses the 3-bit rows (`quantizer.QUANTIZED_BITS`, read at call time). GPTQ's explicit qparams
reproduce its codes exactly for fp32 sources; a 16-bit source can round a weight across a code boundary, which
`gptq` detects and refuses. Statistics cover every row a layer sees, padding tokens and masked camera slots
included (as LLM calibrations usually do); π0 never reads those positions' outputs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qvla_quant import quantizer as _quantizer
from qvla_quant.adapters.base import PolicyAdapter, is_quantizable
from qvla_quant.api import save
from qvla_quant.baselines import RTN_WEIGHT, uniform_plan
from qvla_quant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from qvla_quant.fingerprint import fingerprint_id, model_fingerprint
from qvla_quant.layers import layer_descs
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import BIT_CHOICES, fake_quantize_rows, quantize_rows
from qvla_quant.roles import PlanTemplate
from qvla_quant.transforms import packed_layers, quantize_model

METHODS: tuple[str, ...] = ("rtn", "awq", "gptq", "smoothquant", "module")
PRODUCER_KINDS: tuple[str, ...] = ("layernorm", "gemma_rmsnorm", "rmsnorm", "linear")
DEFAULT_MODULE_BITS: dict[str, int] = {"vision": 4, "language": 8, "action": 8}
AWQ_GRID = 21  # alpha = 0, 0.05, ..., 1
GPTQ_BLOCK = 128
GPTQ_DAMP = 0.01
SMOOTHQUANT_ALPHA = 0.5
FOLD_TOLERANCE = 1e-3  # max |actions after folding - before| / max |actions before|
NO_PRODUCER = "its input is not the output of a per-channel affine op (norm or linear) that could absorb 1/s"

QParams = dict[str, tuple[torch.Tensor, torch.Tensor]]


def quantized_bits() -> tuple[int, ...]:
    """Row bit-widths the packed runtime stores (read at call time: 3-bit rows appear when the format has them)."""
    return tuple(_quantizer.QUANTIZED_BITS)


# ---------------------------------------------------------------------------------------------------------------
# results


class BaselineResult(NamedTuple):
    """plan: what to pack; adapter: around the transformed float copy; qparams: explicit per-row (scale, zero) for
    packing (GPTQ; empty otherwise)."""

    plan: Plan
    adapter: PolicyAdapter
    qparams: QParams

    def quantize(self) -> PolicyAdapter:
        """Pack `adapter.model` in place with the plan (and the explicit qparams); returns the adapter."""

        quantize_model(self.adapter.model, self.plan, qparams=self.qparams or None)
        return self.adapter

    def save(self, path, *, extra: dict | None = None):
        """Write the packed artifact (`qvla_quant.save`); packs a copy unless `quantize()` already ran."""

        adapter = self.adapter
        if not any(True for _ in packed_layers(adapter.model)):
            adapter = copy.copy(adapter)
            adapter.model = quantize_model(self.adapter.model, self.plan, inplace=False, qparams=self.qparams or None)
        return save(path, adapter, self.plan, extra=extra)


# ---------------------------------------------------------------------------------------------------------------
# input groups: which layers read one input, and which op produces it


@dataclass(frozen=True)
class InputGroup:
    """Layers (`consumers`, module names) that read one and the same input tensor, and the op that produces it.

    producer / producer_kind: the module whose output that input is, and how 1/s folds into it (`PRODUCER_KINDS`);
    None when nothing can absorb it (then s = 1, and `reason` says why).
    """

    consumers: tuple[str, ...]
    producer: str | None = None
    producer_kind: str | None = None
    reason: str = ""

    def __post_init__(self):
        if not self.consumers:
            raise ValueError("an InputGroup needs at least one consumer")
        if (self.producer is None) != (self.producer_kind is None):
            raise ValueError(f"InputGroup {self.consumers}: give both producer and producer_kind, or neither")
        if self.producer_kind is not None and self.producer_kind not in PRODUCER_KINDS:
            raise ValueError(
                f"InputGroup {self.consumers}: producer_kind must be one of {PRODUCER_KINDS}, "
                f"got {self.producer_kind!r}"
            )

    @property
    def foldable(self) -> bool:
        return self.producer is not None


def _norm_kind(module: nn.Module) -> tuple[str | None, str]:
    """(kind, why not) of a normalization module, checked on a probe input (an adaptive norm needs more inputs,
    a different formula fails the comparison)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        return None, f"{type(module).__name__} has no per-channel weight"
    if isinstance(module, nn.LayerNorm):
        return "layernorm", ""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if eps is None:
        return None, f"{type(module).__name__} is not a LayerNorm or an RMSNorm with an eps"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, weight.shape[0], generator=gen).to(weight)
    try:
        with torch.no_grad():
            y = module(x).float()
    except Exception as e:  # noqa: BLE001 - any failure means: not a plain norm of one input
        return None, f"{type(module).__name__} cannot be called on its input alone ({type(e).__name__}): adaptive?"
    xf = x.float()
    r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    tol = dict(rtol=1e-3, atol=1e-4) if weight.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    if torch.allclose(y, r * (1.0 + weight.float()), **tol):
        return "gemma_rmsnorm", ""
    if torch.allclose(y, r * weight.float(), **tol):
        return "rmsnorm", ""
    return None, f"{type(module).__name__}'s output is neither x / rms(x) * weight nor * (1 + weight)"


def _sub(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def transformer_input_groups(model: nn.Module, *, shared_value_prefixes: Sequence[str] = ()) -> list[InputGroup]:
    """Input groups of the pre-norm transformer layers found in `model` by their structure.

    Llama/Gemma decoder layers (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up -> down,
    v -> o when the attention reads only its own values and v's outputs are o's inputs) and SigLIP/CLIP encoder
    layers (layer_norm1 -> q/k/v, v -> out_proj, layer_norm2 -> fc1). Layers under one of
    `shared_value_prefixes` attend over values that another model also writes (π0's KV cache): their o_proj keeps
    s = 1. Norms are checked numerically (`_norm_kind`); a norm that fails keeps s = 1 for its readers.
    """
    groups: list[InputGroup] = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if _sub(m, "self_attn") is None or _sub(m, "mlp") is None:
            continue
        if _sub(m, "input_layernorm") is not None and _sub(m, "post_attention_layernorm") is not None:
            norm1, norm2 = "input_layernorm", "post_attention_layernorm"
            out_name, mlp_in, mid = (
                "self_attn.o_proj",
                ["mlp.gate_proj", "mlp.up_proj"],
                ("mlp.up_proj", "mlp.down_proj"),
            )
        elif _sub(m, "layer_norm1") is not None and _sub(m, "layer_norm2") is not None:
            norm1, norm2 = "layer_norm1", "layer_norm2"
            out_name, mlp_in, mid = "self_attn.out_proj", ["mlp.fc1"], None
        else:
            continue
        qkv = [f"self_attn.{x}_proj" for x in ("q", "k", "v")]

        def linears(names, m=m):
            return all(isinstance(_sub(m, n), nn.Linear) and is_quantizable(_sub(m, n)) for n in names)

        for norm, readers in ((norm1, qkv), (norm2, mlp_in)):
            if not linears(readers):
                continue
            kind, why = _norm_kind(m.get_submodule(norm))
            names = tuple(p + r for r in readers)
            groups.append(InputGroup(names, p + norm, kind) if kind else InputGroup(names, reason=why))
        v, o = _sub(m, "self_attn.v_proj"), _sub(m, out_name)
        if linears(["self_attn.v_proj", out_name]):
            if any(name == s.rstrip(".") or name.startswith(s) for s in shared_value_prefixes):
                groups.append(
                    InputGroup(
                        (p + out_name,),
                        reason="its attention mixes these values with another "
                        "model's (π0: the action expert reads the language model's KV cache), so "
                        "v_proj cannot be rescaled alone",
                    )
                )
            elif v.out_features != o.in_features:
                groups.append(
                    InputGroup(
                        (p + out_name,),
                        reason="grouped-query attention: v_proj's outputs are shared by several heads of its input",
                    )
                )
            else:
                groups.append(InputGroup((p + out_name,), p + "self_attn.v_proj", "linear"))
        if mid is not None and linears(list(mid)):
            groups.append(InputGroup((p + mid[1],), p + mid[0], "linear"))
        elif _sub(m, "mlp.fc2") is not None:
            groups.append(
                InputGroup(
                    (p + "mlp.fc2",),
                    reason="its input is act(fc1(x)) with a GELU, which does not commute with a per-channel scale",
                )
            )
    return groups


def pi0_input_groups(model: nn.Module) -> list[InputGroup]:
    """π0 (transformers' PI0ForConditionalGeneration): SigLIP + Gemma language model + Gemma action expert (plain
    RMSNorms in π0; an adaptive norm would fail `_norm_kind` and keep s = 1), plus post_layernorm -> projector and
    the expert's final norm -> action_out_proj."""
    groups = transformer_input_groups(model, shared_value_prefixes=("model.vlm.language_model.", "model.dit."))
    for norm, reader in (
        ("model.vlm.vision_tower.post_layernorm", "model.vlm.multi_modal_projector.linear"),
        ("model.dit.norm", "action_out_proj"),
    ):
        if _sub(model, norm) is not None and isinstance(_sub(model, reader), nn.Linear):
            kind, why = _norm_kind(model.get_submodule(norm))
            groups.append(InputGroup((reader,), norm, kind) if kind else InputGroup((reader,), reason=why))
    patch = "model.vlm.vision_tower.embeddings.patch_embedding"
    if _sub(model, patch) is not None:
        groups.append(InputGroup((patch,), reason="it reads the image"))
    return groups


def input_groups(adapter: PolicyAdapter, given: Iterable[InputGroup] | None = None) -> list[InputGroup]:
    """Every quantizable layer of the adapter in exactly one group: `given` (or the adapter's known structure: π0,
    or any transformer layers found), then one group of its own (s = 1) for each layer left."""
    model = adapter.model
    if given is not None:
        groups = list(given)
    elif adapter.name == "pi0":
        groups = pi0_input_groups(model)
    else:
        groups = transformer_input_groups(model)
    layers = {info.name: info for info in adapter.layers()}
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for c in g.consumers:
            if c in seen:
                raise ValueError(f"layer {c!r} is in two input groups ({groups[seen[c]].consumers} and {g.consumers})")
            module = _sub(model, c)
            if module is None or not is_quantizable(module):
                raise ValueError(f"input group {g.consumers}: {c!r} is not a quantizable layer of the model")
            if g.foldable and not isinstance(module, nn.Linear):
                raise ValueError(
                    f"input group {g.consumers}: {c!r} is a {type(module).__name__}; only nn.Linear "
                    "readers can take a folded input scale"
                )
            seen[c] = i
        if g.foldable:
            producer = _sub(model, g.producer)
            if producer is None:
                raise ValueError(f"input group {g.consumers}: producer {g.producer!r} is not a module of the model")
            width = model.get_submodule(g.consumers[0]).in_features
            if any(model.get_submodule(c).in_features != width for c in g.consumers):
                raise ValueError(f"input group {g.consumers}: its layers do not read inputs of one width")
            if g.producer_kind == "linear" and not (isinstance(producer, nn.Linear) and producer.out_features == width):
                raise ValueError(
                    f"input group {g.consumers}: producer {g.producer!r} must be an nn.Linear with {width} outputs"
                )
            if g.producer_kind != "linear" and getattr(producer, "weight", None) is None:
                raise ValueError(f"input group {g.consumers}: producer {g.producer!r} has no weight to fold into")
    groups += [InputGroup((name,), reason=NO_PRODUCER) for name in layers if name not in seen]
    return groups


# ---------------------------------------------------------------------------------------------------------------
# folding


def fold_input_scale(model: nn.Module, group: InputGroup, s: torch.Tensor) -> None:
    """The equivalent transformation: every consumer's W[:, j] * s_j, the producer's output channel j / s_j.

    The float model computes the same function afterwards (up to rounding)."""
    if not group.foldable:
        raise ValueError(f"input group {group.consumers} has no producer to fold a scale into: {group.reason}")
    s = s.detach().double()
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"input group {group.consumers}: scales must be finite and positive")
    producer = model.get_submodule(group.producer)
    with torch.no_grad():
        for c in group.consumers:
            w = model.get_submodule(c).weight
            w.copy_((w.double() * s[None, :]).to(w.dtype))
        if group.producer_kind == "linear":
            producer.weight.copy_((producer.weight.double() / s[:, None]).to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.copy_((producer.bias.double() / s).to(producer.bias.dtype))
        elif group.producer_kind == "gemma_rmsnorm":
            w = producer.weight
            w.copy_(((1.0 + w.double()) / s - 1.0).to(w.dtype))
        else:  # layernorm, rmsnorm: the output is (normalized * weight + bias)
            producer.weight.copy_((producer.weight.double() / s).to(producer.weight.dtype))
            bias = getattr(producer, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_((bias.double() / s).to(bias.dtype))


# ---------------------------------------------------------------------------------------------------------------
# calibration: layer inputs through forward pre-hooks


def _check_batches(batches) -> list:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError("no calibration samples: pass at least one model-input batch (the same ones QVLA uses)")
    return batches


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows [N, fan_in] in fp32: a Linear's tokens, or a Conv2d's patches (`F.unfold`)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or module.padding == "same":
            raise NotImplementedError(
                f"patch rows of a conv with groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r}"
            )
        padding = 0 if module.padding == "valid" else module.padding
        xb = x.unsqueeze(0) if x.dim() == 3 else x
        cols = F.unfold(
            xb.float(), module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )  # [B, K, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.detach().reshape(-1, x.shape[-1]).float()


def run_calibration(adapter: PolicyAdapter, batches: Sequence, taps: dict[str, Callable[[torch.Tensor], None]]):
    """Run the policy on every batch (its fixed noise, no grad); `taps[name](rows)` sees every call's input rows."""
    model = adapter.model
    handles = []

    def hook_for(module, fn):
        def hook(mod, args):
            fn(layer_input_rows(mod, args[0]))

        return hook

    try:
        for name, fn in taps.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(hook_for(module, fn)))
        with torch.no_grad():
            for batch in batches:
                batch = adapter.to_device(batch)
                adapter.actions(batch, adapter.make_noise(adapter.batch_size(batch), adapter.noise_seed))
    finally:
        for h in handles:
            h.remove()


def execution_order(adapter: PolicyAdapter, batch, names: Iterable[str]) -> list[str]:
    """`names` sorted by when the policy first calls them (never-called ones last, in the given order)."""
    names = list(names)
    first: dict[str, int] = {}

    def tap(name):
        def fn(_rows):
            first.setdefault(name, len(first))

        return fn

    run_calibration(adapter, [batch], {n: tap(n) for n in names})
    return sorted(names, key=lambda n: first.get(n, len(first) + names.index(n)))


@dataclass
class InputStats:
    """Statistics of one input over all calibration calls: N rows, X^T X (fp64), sum |x|, max |x| (per channel)."""

    n: int = 0
    xtx: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    want_xtx: bool = True
    want_abs: bool = True

    def add(self, rows: torch.Tensor) -> None:
        if not rows.shape[0]:
            return
        self.n += rows.shape[0]
        if self.want_xtx:
            xtx = (rows.t() @ rows).double()
            self.xtx = xtx if self.xtx is None else self.xtx.add_(xtx)
        if self.want_abs:
            a = rows.abs()
            s, m = a.sum(0).double(), a.amax(0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)

    def hessian(self) -> torch.Tensor:
        """X^T X / N (fp64; the mean second moment, so objectives are per calibration row)."""
        return self.xtx / max(self.n, 1)

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


def collect_stats(adapter, batches, groups: Sequence[InputGroup], *, xtx=True, absolute=True) -> list[InputStats]:
    """One calibration pass: the statistics of each group's input (read at its first consumer)."""
    stats = [InputStats(want_xtx=xtx, want_abs=absolute) for _ in groups]
    run_calibration(adapter, batches, {g.consumers[0]: st.add for g, st in zip(groups, stats)})
    return stats


def _chunks(groups: Sequence[InputGroup], model: nn.Module, max_bytes: int) -> list[list[int]]:
    """Indices of `groups` in runs whose K x K statistics (fp64) fit in `max_bytes` together (at least one each)."""
    out, cur, used = [], [], 0
    for i, g in enumerate(groups):
        k = math.prod(model.get_submodule(g.consumers[0]).weight.shape[1:])
        need = 8 * k * k
        if cur and used + need > max_bytes:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += need
    return out + ([cur] if cur else [])


# ---------------------------------------------------------------------------------------------------------------
# plans


def planned_layers(adapter: PolicyAdapter, template: PlanTemplate | None, bits: int) -> dict[str, tuple[str, int]]:
    """{layer name: (role, row bits)} of the layers the template quantizes: rule "auto" -> `bits`, a fixed int -> it,
    "skip" -> left out (as in QVLA's calibration and the RTN rows of the benchmarks)."""
    template = template or PlanTemplate()
    out = {}
    for info in adapter.layers():
        rule = template.rule_for(info.name, info.role)
        if rule == "skip":
            continue
        out[info.name] = (info.role, bits if rule == "auto" else int(rule))
    if not out:
        raise ValueError("the template quantizes no layer of this policy (every role is 'skip')")
    return out


def _plan(adapter, planned, *, method, quant, budget, info, group_size=None, grouped_layers=()) -> Plan:

    layers = {}
    for info_ in adapter.layers():
        if info_.name in planned:
            role, b = planned[info_.name]
            extra = {}
            if info_.name in grouped_layers:
                extra = {"group_size": group_size, "grouped": [True] * info_.out_features}
            layers[info_.name] = LayerPlan(
                info_.name, role, info_.kind, info_.out_features, info_.fan_in, [b] * info_.out_features, **extra
            )
    plan = Plan(
        layers=layers,
        quant=quant,
        budget=budget,
        method=method,
        info=info,
        model_fingerprint=fingerprint_id(model_fingerprint(adapter.model)),
    )
    return plan


def _copy_adapter(adapter: PolicyAdapter, inplace: bool) -> PolicyAdapter:
    if not isinstance(adapter, PolicyAdapter):
        raise TypeError(f"expected a PolicyAdapter (see qvla_quant.adapters), got {type(adapter).__name__}")

    if any(True for _ in packed_layers(adapter.model)):
        raise ValueError("the policy is already quantized (it holds PackedLinear layers): start from the float model")
    if inplace:
        return adapter
    new = copy.copy(adapter)
    new.model = copy.deepcopy(adapter.model)
    return new


def _float_reference(adapter: PolicyAdapter, inplace: bool) -> PolicyAdapter:
    """The untouched float policy that a folding check compares with: the adapter itself, or a copy of it when the
    transformation works in place."""
    if not inplace:
        return adapter
    original = copy.copy(adapter)
    original.model = copy.deepcopy(adapter.model)
    return original


def _check_bits(method: str, bits: int, allowed: Iterable[int]) -> int:
    allowed = tuple(allowed)
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"{method}: bits must be one of {allowed} (what the packed format stores), got {bits!r}")
    return int(bits)


def _source_id(model) -> str:

    return fingerprint_id(model_fingerprint(model))


def _samples(adapter, batches) -> int:
    return sum(adapter.batch_size(b) for b in batches)


def check_fold(adapter_before: PolicyAdapter, adapter_after: PolicyAdapter, batch, what: str) -> float:
    """max |actions after - before| / max |actions before| on one batch; raises above `FOLD_TOLERANCE`."""
    with torch.no_grad():
        noise = adapter_before.make_noise(adapter_before.batch_size(batch), adapter_before.noise_seed)
        a0 = adapter_before.actions(batch, noise).float()
        a1 = adapter_after.actions(batch, noise).float()
    rel = float((a1 - a0).abs().max() / a0.abs().max().clamp_min(1e-12))
    if not rel <= FOLD_TOLERANCE:
        raise ValueError(
            f"{what}: folding the input scales changed the float policy's actions by {rel:.2e} "
            f"(relative; expected fp rounding only): an input group's producer is not what it "
            "seems; pass input_groups=... explicitly"
        )
    return rel


# ---------------------------------------------------------------------------------------------------------------
# AWQ


def awq_objective(
    weights: Sequence[torch.Tensor],
    bits: Sequence[int],
    hessian: torch.Tensor,
    s: torch.Tensor,
    config: WeightQuantConfig | None = None,
) -> float:
    """sum_c ||Q(W_c diag(s)) diag(s)^-1 x - W_c x||^2 averaged over calibration rows x, as sum dW H dW^T with
    H = X^T X / N (fp64)."""
    total = 0.0
    s64 = s.double()
    for w, b in zip(weights, bits):
        w64 = w.detach().double()
        scaled = (w64 * s64[None, :]).float()
        dw = fake_quantize_rows(scaled, b, config).double() / s64[None, :] - w64
        total += float(((dw @ hessian) * dw).sum())
    return total


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalized to geometric mean of its extremes 1 (a common factor changes nothing: the
    per-row quantizer is scale-equivariant); channels never active get s = 1 before normalization."""
    m = mean_abs.double()
    s = torch.where(m > 0, m.clamp_min(1e-8).pow(alpha), torch.ones_like(m))
    return s / (s.max() * s.min()).sqrt()


def awq_search(weights, bits, hessian, mean_abs, *, grid: int = AWQ_GRID, config=None):
    """(best alpha, its scales, [(alpha, objective)] over the grid) for one input group."""
    losses = []
    best = (math.inf, 0.0, None)
    for alpha in torch.linspace(0.0, 1.0, grid).tolist():
        s = awq_scales(mean_abs, alpha)
        loss = awq_objective(weights, bits, hessian, s, config)
        losses.append((alpha, loss))
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[1], best[2], losses


def awq(
    adapter: PolicyAdapter,
    batches,
    bits: int = 4,
    *,
    template: PlanTemplate | None = None,
    grid: int = AWQ_GRID,
    weight: WeightQuantConfig = RTN_WEIGHT,
    groups: Iterable[InputGroup] | None = None,
    max_stat_bytes: int = 256 << 20,
    inplace: bool = False,
) -> BaselineResult:
    """AWQ W{bits}A16: per input group, the alpha of the grid that minimizes the group's output error; 1/s folded
    into the producer, s into the weights; rows quantized per row by `weight` (default plain min-max RTN).

    Statistics come from the float model (folding keeps its function), gathered for as many groups per calibration
    pass as fit in `max_stat_bytes` of K x K matrices and dropped once their group is scaled. `groups`: input groups
    to use instead of the adapter's (`input_groups`)."""
    bits = _check_bits("awq", bits, quantized_bits())
    if grid < 2:
        raise ValueError(f"awq: grid must have at least 2 points (alpha 0 and 1), got {grid}")
    batches = _check_batches(batches)
    t0 = time.perf_counter()
    source = _source_id(adapter.model)
    new = _copy_adapter(adapter, inplace)
    original = _float_reference(adapter, inplace)
    planned = planned_layers(new, template, bits)
    groups = input_groups(new, groups)
    model = new.model
    work, layer_info = [], {}
    for g in groups:
        quantized = [c for c in g.consumers if c in planned and planned[c][1] in quantized_bits()]
        if not quantized:
            continue
        if not g.foldable:
            for c in quantized:
                layer_info[c] = {"s": 1, "reason": g.reason}
            continue
        work.append((g, quantized))
    group_info = []
    for chunk in _chunks([g for g, _ in work], model, max_stat_bytes):
        items = [work[i] for i in chunk]
        stats = collect_stats(new, batches, [g for g, _ in items])
        for (g, quantized), st in zip(items, stats):
            if st.n == 0:
                for c in quantized:
                    layer_info[c] = {"s": 1, "reason": "never called on the calibration samples"}
                continue
            weights = [model.get_submodule(c).weight for c in quantized]
            alpha, s, losses = awq_search(
                weights, [planned[c][1] for c in quantized], st.hessian(), st.mean_abs(), grid=grid, config=weight
            )
            fold_input_scale(model, g, s)
            rtn_loss = losses[0][1]
            best_loss = min(v for _, v in losses)
            group_info.append(
                {
                    "layers": list(g.consumers),
                    "producer": g.producer,
                    "kind": g.producer_kind,
                    "alpha": alpha,
                    "objective": best_loss,
                    "objective_rtn": rtn_loss,
                    "s_range": [float(s.min()), float(s.max())],
                }
            )
            for c in quantized:
                layer_info[c] = {"alpha": alpha, "producer": g.producer}
    fold = check_fold(original, new, adapter.to_device(batches[0]), "awq")
    info = {
        "baseline": "AWQ",
        "method": "awq",
        "bits": bits,
        "activation_bits": 16,
        "alpha_grid": grid,
        "weight_quantizer": weight.to_dict(),
        "calibration_samples": _samples(new, batches),
        "calibrated_on": source,
        "fold_check_rel": fold,
        "groups": group_info,
        "layers": layer_info,
        "time_s": time.perf_counter() - t0,
    }
    quant = QuantConfig(weight=weight, activation=ActivationQuantConfig(16))
    plan = _plan(new, planned, method=f"awq-w{bits}a16", quant=quant, budget=float(bits), info=info)
    return BaselineResult(plan, new, {})


# ---------------------------------------------------------------------------------------------------------------
# GPTQ


class GPTQLayer(NamedTuple):
    codes: torch.Tensor  # uint8 [R, K]
    scale: torch.Tensor  # fp32 [R]
    zero: torch.Tensor  # uint8 [R]
    weight: torch.Tensor  # fp32 [R, K] = (codes - zero) * scale
    damp: float  # the damping finally used (relative to mean diag H)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    diag_mean = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * max(diag_mean, 1e-12) * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True), damp
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite in floating point: damp more
            damp *= 10
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping {damp:g}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    config: WeightQuantConfig | None = None,
    block_size: int = GPTQ_BLOCK,
    damp: float = GPTQ_DAMP,
    act_order: bool = False,
    group_size: int | None = None,
) -> GPTQLayer:
    """GPTQ of one weight [R, K] (rows; a conv's filters flattened) with H = X^T X / N of its input rows.

    Per-row: scale/zero from the original rows (`quantize_rows`: min-max, or `config`'s clip search). Grouped
    (`group_size` g): each group's scale/zero from its columns as GPTQ has updated them when it reaches the group's
    first column (the quantizer's group rule, so the packer's groups are these). Then columns in order (per-row
    with act_order: by decreasing H_jj) quantized as q = clamp(round(w / s) + z, 0, 2^b - 1), the error
    (w - w_hat) / U_jj propagated to the later columns through the upper Cholesky factor U of H^-1, lazily in
    blocks (a multiple of g when grouped, so a group never straddles two blocks).
    Returns codes, scale / zero ([R], or [R, ceil(K / g)] grouped) and w_hat = (codes - zero) * scale in fp32.
    """
    if bits not in quantized_bits():
        raise ValueError(f"gptq: bits must be one of {quantized_bits()}, got {bits}")
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    r, k = rows.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: Hessian {tuple(hessian.shape)} does not fit a weight of {k} columns")
    qmax = (1 << bits) - 1
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # never-active inputs: quantized plainly, nothing to compensate with
    w = rows.clone()
    if group_size is not None:
        if act_order:
            raise ValueError("gptq: act_order with group-wise scales would need reordered groups; use one of them")
        _check_group(bits, group_size)
        block_size = -(-block_size // group_size) * group_size
        n_g = -(-k // group_size)
        scale = torch.empty(r, n_g, dtype=torch.float32)
        zero = torch.empty(r, n_g, dtype=torch.float32)
    else:
        _, scale, zero = quantize_rows(rows, bits, config)
        s, z = scale.float()[:, None], zero.float()[:, None]
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    u, damp = _upper_inverse_cholesky(h, damp)
    u = u.float()
    codes = torch.zeros(r, k, dtype=torch.float32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size is not None and j % group_size == 0:
                _, sg, zg = quantize_rows(w1[:, i : i + group_size], bits, config)
                scale[:, j // group_size], zero[:, j // group_size] = sg, zg.float()
                s, z = sg.float()[:, None], zg.float()[:, None]
            col = w1[:, i : i + 1]
            q = torch.clamp(torch.round(col / s) + z, 0, qmax)
            codes[:, j] = q[:, 0]
            err = (col - (q - z) * s) / u1[i, i]
            w1[:, i:] -= err @ u1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inv = torch.argsort(perm)
    codes = codes[:, inv].to(torch.uint8)
    if group_size is not None:
        zero = zero.to(torch.uint8)
        cols = torch.arange(k) // group_size
        w_hat = (codes.float() - zero.float()[:, cols]) * scale[:, cols]  # quantizer.dequantize_rows, grouped
    else:
        w_hat = (codes.float() - zero.float()[:, None]) * scale.float()[:, None]  # quantizer.dequantize_rows
    return GPTQLayer(codes, scale, zero, w_hat, damp)


def _check_group(bits: int, group_size: int) -> None:
    grouped_bits = tuple(getattr(_quantizer, "GROUPED_BITS", ()))
    sizes = tuple(getattr(_quantizer, "GROUP_SIZES", ()))
    if not grouped_bits:
        raise NotImplementedError(
            "gptq: grouped scales need a packed format with group-wise scales; this "
            "qvla_quant stores one scale/zero per row: use group_size=None"
        )
    if bits not in grouped_bits:
        raise ValueError(f"gptq: group-wise scales are for rows at {grouped_bits} bits, not {bits}")
    if group_size not in sizes:
        raise ValueError(f"gptq: group_size must be one of {sizes}, got {group_size!r}")


def gptq(
    adapter: PolicyAdapter,
    batches,
    bits: int = 4,
    *,
    template: PlanTemplate | None = None,
    weight: WeightQuantConfig = RTN_WEIGHT,
    block_size: int = GPTQ_BLOCK,
    damp: float = GPTQ_DAMP,
    act_order: bool = False,
    group_size: int | None = None,
    sequential: bool = True,
    groups: Iterable[InputGroup] | None = None,
    max_stat_bytes: int = 256 << 20,
    inplace: bool = False,
) -> BaselineResult:
    """GPTQ W{bits}A16, per-row scale/zero or grouped (`group_size`, one scale/zero per g columns). Layers reading
    one input share its H; sequential: groups in the order the policy calls them, each measured with the earlier
    ones already quantized (one pass per group); otherwise groups are measured together in runs of
    `max_stat_bytes` of statistics.

    The float copy holds GPTQ's dequantized weights and `qparams` its scales/zeros, so that packing yields exactly
    GPTQ's codes. A conv whose patches `F.unfold` cannot form falls back to RTN (noted in plan.info).
    """
    bits = _check_bits("gptq", bits, quantized_bits())
    if group_size is not None:
        _check_group(bits, group_size)
        if act_order:
            raise ValueError("gptq: act_order with group-wise scales would need reordered groups; use one of them")
    if block_size < 1:
        raise ValueError(f"gptq: block_size must be >= 1, got {block_size}")
    batches = _check_batches(batches)
    t0 = time.perf_counter()
    source = _source_id(adapter.model)
    new = _copy_adapter(adapter, inplace)
    planned = planned_layers(new, template, bits)
    model = new.model
    work, layer_info = [], {}
    for g in input_groups(new, groups):
        quantized = [c for c in g.consumers if c in planned and planned[c][1] in quantized_bits()]
        if not quantized:
            continue
        module = model.get_submodule(quantized[0])
        try:
            layer_input_rows(
                module,
                torch.zeros(1, module.in_channels, *module.kernel_size)
                if isinstance(module, nn.Conv2d)
                else torch.zeros(1, module.in_features),
            )
        except NotImplementedError as e:
            for c in quantized:
                layer_info[c] = {"gptq": False, "reason": f"RTN instead: {e} is not supported"}
            continue
        work.append((InputGroup(tuple(quantized)), quantized))
    if sequential and len(work) > 1:
        order = execution_order(new, adapter.to_device(batches[0]), [g.consumers[0] for g, _ in work])
        rank = {n: i for i, n in enumerate(order)}
        work.sort(key=lambda item: rank[item[0].consumers[0]])
    chunks = [[i] for i in range(len(work))] if sequential else _chunks([g for g, _ in work], model, max_stat_bytes)
    qparams: QParams = {}
    grouped_layers: set[str] = set()
    for chunk in chunks:
        items = [work[i] for i in chunk]
        stats = collect_stats(new, batches, [g for g, _ in items], absolute=False)
        for (_, quantized), st in zip(items, stats):
            if st.n == 0:
                for c in quantized:
                    layer_info[c] = {"gptq": False, "reason": "RTN instead: never called on the calibration samples"}
                continue
            h = 2.0 * st.hessian()
            for c in quantized:
                module, b = model.get_submodule(c), planned[c][1]
                gs = group_size if group_size is not None and b in _quantizer.GROUPED_BITS else None
                res = gptq_quantize(
                    module.weight,
                    h,
                    b,
                    config=weight,
                    block_size=block_size,
                    damp=damp,
                    act_order=act_order,
                    group_size=gs,
                )
                with torch.no_grad():
                    module.weight.copy_(res.weight.reshape(module.weight.shape).to(module.weight.dtype))
                    stored = module.weight.detach().reshape(res.codes.shape).float()
                if not torch.equal(_codes_with(stored, b, res.scale, res.zero, gs), res.codes):
                    raise ValueError(
                        f"gptq: {c}: GPTQ's weights do not survive rounding to {module.weight.dtype} "
                        f"at {b} bits; quantize an fp32 copy of the policy"
                    )
                qparams[c] = (res.scale, res.zero)
                if gs is not None:
                    grouped_layers.add(c)
                layer_info[c] = {
                    "gptq": True,
                    "damp": res.damp,
                    "calibration_rows": st.n,
                    **({"group_size": gs} if gs else {}),
                }
            del h
        del stats
    info = {
        "baseline": "GPTQ",
        "method": "gptq",
        "bits": bits,
        "activation_bits": 16,
        "granularity": "row" if group_size is None else f"group of {group_size} columns",
        "block_size": block_size,
        "damp": damp,
        "act_order": act_order,
        "sequential": sequential,
        "weight_quantizer": weight.to_dict(),
        "calibration_samples": _samples(new, batches),
        "calibrated_on": source,
        "layers": layer_info,
        "time_s": time.perf_counter() - t0,
    }
    quant = QuantConfig(weight=weight, activation=ActivationQuantConfig(16))
    suffix = "" if group_size is None else f"g{group_size}"
    plan = _plan(
        new,
        planned,
        method=f"gptq-w{bits}{suffix}a16",
        quant=quant,
        budget=float(bits),
        info=info,
        group_size=group_size,
        grouped_layers=grouped_layers,
    )
    return BaselineResult(plan, new, qparams)


def _codes_with(
    rows: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """clamp(round(w / s) + z, 0, 2^b - 1) with given per-row [R] or per-group [R, G] scale/zero (uint8 codes)."""
    s, z = scale.float(), zero.float()
    if group_size is not None:
        cols = torch.arange(rows.shape[1]) // group_size
        s, z = s[:, cols], z[:, cols]
    else:
        s, z = s[:, None], z[:, None]
    return torch.clamp(torch.round(rows / s) + z, 0, (1 << bits) - 1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# SmoothQuant


def smoothquant_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_c max_i |W_c[i, j]|^(1 - alpha); channels never active (or all-zero weights)
    keep s = 1."""
    w_max = torch.stack([w.detach().abs().amax(0).double() for w in weights]).amax(0)
    x = x_absmax.double()
    s = x.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5)


def smoothquant(
    adapter: PolicyAdapter,
    batches,
    bits: int = 8,
    *,
    alpha: float = SMOOTHQUANT_ALPHA,
    template: PlanTemplate | None = None,
    weight: WeightQuantConfig = RTN_WEIGHT,
    groups: Iterable[InputGroup] | None = None,
    inplace: bool = False,
) -> BaselineResult:
    """SmoothQuant W{bits}A8: per input group s from the calibration max |x| and the weights, folded like AWQ; the
    plan runs every planned layer with A8 (per-token dynamic int8) activations, smoothed or not."""
    bits = _check_bits("smoothquant", bits, quantized_bits())
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    batches = _check_batches(batches)
    t0 = time.perf_counter()
    source = _source_id(adapter.model)
    new = _copy_adapter(adapter, inplace)
    original = _float_reference(adapter, inplace)
    planned = planned_layers(new, template, bits)
    model = new.model
    work, layer_info, group_info = [], {}, []
    for g in input_groups(new, groups):
        quantized = [c for c in g.consumers if c in planned and planned[c][1] in quantized_bits()]
        if not quantized:
            continue
        if g.foldable:
            work.append(g)
        else:
            for c in quantized:
                layer_info[c] = {"s": 1, "reason": g.reason}
    stats = collect_stats(new, batches, work, xtx=False) if work else []
    for g, st in zip(work, stats):
        if st.n == 0:
            for c in g.consumers:
                layer_info[c] = {"s": 1, "reason": "never called on the calibration samples"}
            continue
        s = smoothquant_scales(st.abs_max, [model.get_submodule(c).weight for c in g.consumers], alpha)
        fold_input_scale(model, g, s)
        group_info.append(
            {
                "layers": list(g.consumers),
                "producer": g.producer,
                "kind": g.producer_kind,
                "x_absmax_max": float(st.abs_max.max()),
                "s_range": [float(s.min()), float(s.max())],
            }
        )
        for c in g.consumers:
            if c in planned:
                layer_info[c] = {"smoothed": True, "producer": g.producer}
    fold = check_fold(original, new, adapter.to_device(batches[0]), "smoothquant")
    info = {
        "baseline": "SmoothQuant",
        "method": "smoothquant",
        "bits": bits,
        "activation_bits": 8,
        "alpha": alpha,
        "activation_quantizer": "per-token dynamic asymmetric int8 (the runtime's A8)",
        "weight_quantizer": weight.to_dict(),
        "calibration_samples": _samples(new, batches),
        "calibrated_on": source,
        "fold_check_rel": fold,
        "groups": group_info,
        "layers": layer_info,
        "time_s": time.perf_counter() - t0,
    }
    quant = QuantConfig(weight=weight, activation=ActivationQuantConfig(8))
    plan = _plan(new, planned, method=f"smoothquant-w{bits}a8", quant=quant, budget=float(bits), info=info)
    return BaselineResult(plan, new, {})


# ---------------------------------------------------------------------------------------------------------------
# module-wise and plain RTN


def module_wise_plan(
    layers_spec, role_bits: dict[str, int] | None = None, *, weight: WeightQuantConfig = RTN_WEIGHT
) -> Plan:
    """One bit-width per role (default vision 4, language 8, action 8), per-row RTN; `layers_spec` as for
    `baselines.uniform_plan` (a template Plan or layer descriptions: LayerPlans, an adapter's layers, ...)."""

    role_bits = dict(DEFAULT_MODULE_BITS if role_bits is None else role_bits)
    for role, b in role_bits.items():
        if isinstance(b, bool) or b not in BIT_CHOICES:
            raise ValueError(f"module_wise_plan: bits for role {role!r} must be one of {BIT_CHOICES}, got {b!r}")
    specs = layer_descs(layers_spec.layers.values() if isinstance(layers_spec, Plan) else layers_spec)
    missing = sorted({d.role for d in specs if d.role not in role_bits})
    if missing:
        raise ValueError(f"module_wise_plan: no bit-width for role(s) {missing} (given: {sorted(role_bits)})")
    layers = {
        d.name: LayerPlan(d.name, d.role, d.kind, d.out_features, d.fan_in, [role_bits[d.role]] * d.out_features)
        for d in specs
    }
    template = layers_spec if isinstance(layers_spec, Plan) else None
    activation = template.quant.activation if template else ActivationQuantConfig()
    used = {r: role_bits[r] for r in sorted({d.role for d in specs})}
    plan = Plan(
        layers=layers,
        quant=QuantConfig(weight=weight, activation=activation),
        model_fingerprint=template.model_fingerprint if template else "",
        method="module-" + "-".join(f"{r}{b}" for r, b in used.items()),
        info={
            "baseline": "module-wise mixed precision",
            "method": "module",
            "role_bits": used,
            "weight_quantizer": weight.to_dict(),
        },
    )
    plan.budget = plan.average_bits()
    return plan


def module_wise(
    adapter: PolicyAdapter,
    role_bits: dict[str, int] | None = None,
    *,
    template: PlanTemplate | None = None,
    weight: WeightQuantConfig = RTN_WEIGHT,
) -> BaselineResult:
    """`module_wise_plan` over the template's layers of `adapter` (no calibration needed)."""
    new = _copy_adapter(adapter, False)
    planned = planned_layers(new, template, 16)
    specs = [i for i in new.layers() if i.name in planned]
    plan = module_wise_plan(specs, role_bits, weight=weight)
    for name, (_, b) in planned.items():  # a template's fixed bits win over the role's
        if b != 16 or (template and template.rule_for(name, plan.layers[name].role) == 16):
            lp = plan.layers[name]
            plan.layers[name] = LayerPlan(lp.name, lp.role, lp.kind, lp.out_features, lp.fan_in, [b] * lp.out_features)
    plan.budget = plan.average_bits()
    plan.model_fingerprint = _source_id(new.model)
    return BaselineResult(plan, new, {})


def rtn(
    adapter: PolicyAdapter,
    bits: int = 4,
    *,
    template: PlanTemplate | None = None,
    weight: WeightQuantConfig = RTN_WEIGHT,
    activation_bits: int = 16,
) -> BaselineResult:
    """Uniform per-channel RTN over the template's layers (`baselines.uniform_plan`)."""
    bits = _check_bits("rtn", bits, quantized_bits())
    new = _copy_adapter(adapter, False)
    planned = planned_layers(new, template, bits)
    specs = [i for i in new.layers() if i.name in planned]
    quant = QuantConfig(weight=weight, activation=ActivationQuantConfig(activation_bits))
    plan = uniform_plan(specs, bits, quant=quant)
    for name, (_, b) in planned.items():  # fixed bits of the template
        if b != bits:
            lp = plan.layers[name]
            plan.layers[name] = LayerPlan(lp.name, lp.role, lp.kind, lp.out_features, lp.fan_in, [b] * lp.out_features)
    plan.model_fingerprint = _source_id(new.model)
    plan.info.update(
        {"method": "rtn", "bits": bits, "activation_bits": activation_bits, "weight_quantizer": weight.to_dict()}
    )
    return BaselineResult(plan, new, {})


def run_baseline(
    method: str,
    adapter: PolicyAdapter,
    batches=None,
    *,
    bits: int | None = None,
    role_bits: dict[str, int] | None = None,
    **kwargs,
) -> BaselineResult:
    """Dispatch by name (`METHODS`): rtn, awq, gptq, smoothquant (bits) or module (role_bits)."""
    if method == "module":
        return module_wise(adapter, role_bits, **kwargs)
    if method not in METHODS:
        raise ValueError(f"unknown baseline method {method!r}; known: {METHODS}")
    if bits is None:
        bits = 8 if method == "smoothquant" else 4
    if method == "rtn":
        return rtn(adapter, bits, **kwargs)
    fn = {"awq": awq, "gptq": gptq, "smoothquant": smoothquant}[method]
    return fn(adapter, batches, bits, **kwargs)


def parse_bits_arg(method: str, text: str | None) -> tuple[int | None, dict[str, int] | None]:
    """(bits, role_bits) from a command-line --bits: "4", or for method "module" "vision=4,language=8,action=8"."""
    if method == "module":
        if not text:
            return None, dict(DEFAULT_MODULE_BITS)
        role_bits = {}
        for part in text.split(","):
            role, sep, value = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                role_bits[role.strip()] = int(value)
            except ValueError:
                raise ValueError(
                    f"--bits for the module-wise baseline is role=bits pairs like "
                    f"vision=4,language=8,action=8, got {text!r}"
                ) from None
        return None, role_bits
    if not text:
        return None, None
    try:
        return int(text), None
    except ValueError:
        raise ValueError(f"--bits for {method} is one bit-width from {quantized_bits()}, got {text!r}") from None


__all__ = [
    "BaselineResult",
    "GPTQLayer",
    "InputGroup",
    "InputStats",
    "METHODS",
    "awq",
    "awq_objective",
    "awq_scales",
    "awq_search",
    "collect_stats",
    "fold_input_scale",
    "gptq",
    "gptq_quantize",
    "input_groups",
    "layer_input_rows",
    "module_wise",
    "module_wise_plan",
    "parse_bits_arg",
    "pi0_input_groups",
    "rtn",
    "run_baseline",
    "run_calibration",
    "smoothquant",
    "smoothquant_scales",
    "transformer_input_groups",
]
