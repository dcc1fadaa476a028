"""Uniform round-to-nearest baselines (the comparisons of the paper's Table 3, and beyond it), as ordinary plans.

- per-channel RTN (W8 / W6 / W4 / W3 / W2): every row of every layer at b bits, one scale and zero point per row;
- layer-wise RTN: every row at b bits, ONE scale and zero point per tensor (LayerPlan.granularity = "tensor");
- group-wise RTN (W4 / W3 / W2, g = 64 / 128 / 256): every row at b bits with one scale and zero point per group
  of g weights along K (`grouped_plan`; LayerPlan.group_size = g, every row grouped). Its plan average counts the
  groups' extra scales and zero points (b + 40 (ceil(K/g) - 1) / K bits per weight), so it is above b; the plan's
  budget is that average.

All are Plans, so they go through the same `quantize_model` / packed storage / artifact as QVLA allocations:
the layer-wise variant is stored in the same format with the shared scale/zero repeated per row (fp32 + uint8 per
row, a 40/K bits-per-weight overhead that the kernels then need not special-case).

RTN here means plain min-max round-to-nearest: the quantizer's MSE clip search is off unless a `quant` config
says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from qvla_quant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from qvla_quant.layers import LayerDesc, layer_descs
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import GROUPED_BITS, QUANTIZED_BITS, check_granularity, check_group_size

RTN_WEIGHT = WeightQuantConfig(clip_search=False)


def _descs(layers: Plan | Iterable[LayerDesc]) -> list[LayerDesc]:
    """The layers of a template plan, or the given descriptions (LayerPlans, an adapter's LayerInfos, ...)."""
    return layer_descs(layers.layers.values() if isinstance(layers, Plan) else layers)


def uniform_plan(
    layers_spec: Plan | Iterable[LayerDesc],
    bits: int,
    *,
    granularity: str = "row",
    activation_bits: int | None = None,
    quant: QuantConfig | None = None,
    group_size: int | None = None,
) -> Plan:
    """Every row of every layer at `bits` (2, 3, 4, 6 or 8; 16 gives the unquantized reference plan).

    layers_spec: a template Plan (its layers, fingerprint and activation setting are reused), LayerPlans, or
    (name, role, kind, out_features, fan_in) tuples. granularity "row": per-channel RTN; "tensor": layer-wise.
    group_size (64, 128, 256; bits 2, 3 or 4, granularity "row"): every row with group-wise scales.
    activation_bits (16 or 8) overrides the template's; quant replaces the whole quantizer config.
    """
    if bits not in (*QUANTIZED_BITS, 16):
        raise ValueError(f"uniform_plan: bits must be one of {(*QUANTIZED_BITS, 16)}, got {bits}")
    check_granularity(granularity)
    check_group_size(group_size)
    if group_size is not None and (bits not in GROUPED_BITS or granularity != "row"):
        raise ValueError(
            f"uniform_plan: group-wise scales are for per-row granularity at {GROUPED_BITS} bits, got {bits} bits, "
            f"granularity {granularity!r}"
        )
    template = layers_spec if isinstance(layers_spec, Plan) else None
    if quant is None:
        activation = template.quant.activation if template else ActivationQuantConfig()
        if activation_bits is not None:
            activation = ActivationQuantConfig(activation_bits)
        quant = QuantConfig(weight=RTN_WEIGHT, activation=activation)
    elif activation_bits is not None and activation_bits != quant.activation.bits:
        raise ValueError(f"activation_bits={activation_bits} contradicts quant.activation.bits={quant.activation.bits}")
    grouped = (lambda out: [True] * out) if group_size is not None else (lambda out: None)
    layers = {
        d.name: LayerPlan(
            d.name,
            d.role,
            d.kind,
            d.out_features,
            d.fan_in,
            [bits] * d.out_features,
            granularity,
            group_size,
            grouped(d.out_features),
        )
        for d in _descs(layers_spec)
    }
    kind = "channel" if granularity == "row" else "layer"
    info = {"baseline": f"{kind}-wise RTN", "granularity": granularity}
    if group_size is not None:
        kind = f"group{group_size}"
        info = {"baseline": f"group-wise RTN (g = {group_size})", "granularity": granularity, "group_size": group_size}
    plan = Plan(
        layers=layers,
        quant=quant,
        budget=float(bits),
        model_fingerprint=template.model_fingerprint if template else "",
        method=f"rtn-{kind}-w{bits}a{quant.activation.bits}",
        info=info,
    )
    if group_size is not None:  # the groups' scales are in the average: the budget this plan spends
        plan.budget = plan.average_bits()
    return plan


def layerwise_plan(layers_spec: Plan | Iterable[LayerDesc], bits: int, **kwargs) -> Plan:
    """Layer-wise RTN: `uniform_plan(..., granularity="tensor")` (one scale/zero per tensor)."""
    return uniform_plan(layers_spec, bits, granularity="tensor", **kwargs)


def grouped_plan(layers_spec: Plan | Iterable[LayerDesc], bits: int, group_size: int = 128, **kwargs) -> Plan:
    """Group-wise RTN: `uniform_plan(..., group_size=group_size)` (one scale/zero per g weights of every row)."""
    return uniform_plan(layers_spec, bits, group_size=group_size, **kwargs)


def table3_plans(layers_spec: Plan | Iterable[LayerDesc], bits: Iterable[int] = (8, 4, 2), **kwargs) -> dict[str, Plan]:
    """Per-channel and layer-wise RTN at each bit-width, keyed by the plan's method name."""
    specs = layers_spec if isinstance(layers_spec, Plan) else _descs(layers_spec)
    plans = [uniform_plan(specs, b, granularity=g, **kwargs) for b in bits for g in ("row", "tensor")]
    return {p.method: p for p in plans}


def rtn_plans(
    layers_spec: Plan | Iterable[LayerDesc],
    bits: Iterable[int] = (8, 4, 3, 2),
    group_sizes: Iterable[int] = (128,),
    **kwargs,
) -> dict[str, Plan]:
    """Every RTN baseline at each bit-width: per-channel, layer-wise and, at 2, 3 and 4 bits, group-wise for each
    group size; keyed by the plan's method name (e.g. "rtn-channel-w3a16", "rtn-group128-w2a16")."""
    specs = layers_spec if isinstance(layers_spec, Plan) else _descs(layers_spec)
    plans = dict(table3_plans(specs, bits, **kwargs))
    for b in bits:
        if b in GROUPED_BITS:
            for g in group_sizes:
                p = grouped_plan(specs, b, g, **kwargs)
                plans[p.method] = p
    return plans


def linear_layers_spec(model: nn.Module, role: str = "other") -> list[LayerDesc]:
    """Every plain nn.Linear / nn.Conv2d of `model` as a layer spec with one role (tests and generic models;
    policy adapters report real roles and leave out what must stay in full precision)."""
    specs = []
    for name, module in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
            continue  # never called as a module (see transforms.planned_modules)
        for base, kind in ((nn.Linear, "linear"), (nn.Conv2d, "conv")):
            if isinstance(module, base) and type(module).forward is base.forward:
                w = module.weight
                specs.append(LayerDesc(name, role, kind, w.shape[0], math.prod(w.shape[1:])))
    return specs
