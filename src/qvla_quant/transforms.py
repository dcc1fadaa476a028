"""Whole-model transforms: from a float model and a Plan to a packed model (`quantize_model`) or to the fake-quantized
reference that tests and baselines compare with (`fake_quantize_model`), and helpers over every packed layer of a
model. The packed format itself (one layer's tensors and forward) is `qvla_quant.packed`; packed token embeddings
(`Plan.embeddings`) are `qvla_quant.packed_embedding`.

Memory of `quantize_model` (in place): each float layer is freed as soon as its packed replacement is in the model
(nothing here keeps a reference to a replaced module), and the work goes from the cheapest to the largest (tables
not stored first: dropping them frees memory at no cost; then layers and tables by ascending size), so the peak
stays at the float model plus the transient of one layer: `PackedLinear.from_float` holds a few fp32 copies of the
layer being packed, `PackedEmbedding.from_float` a few blocks of 16 MiB. It cannot free what the caller still
references (an adapter's `layers()` list, a deep copy, tied weights shared with a module that stays float).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qvla_quant import kernels
from qvla_quant.fingerprint import model_fingerprint
from qvla_quant.packed import SOURCE_FINGERPRINT_ATTR, PackedLinear
from qvla_quant.packed_embedding import QUANTIZE_BLOCK_BYTES, pack_embedding, planned_embeddings
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.quantizer import (
    KEEP_BITS,
    PRUNE_BITS,
    fake_quantize_activation,
    fake_quantize_rows,
    fake_quantize_weight,
)


def repack_kept(model: nn.Module) -> int:
    """`PackedLinear.repack_kept` on every packed layer of `model` (format-1 layers loaded from an old artifact);
    returns how many changed."""
    return sum(m.repack_kept() for m in model.modules() if isinstance(m, PackedLinear))


def set_dequantized_cache(model: nn.Module, enabled: bool) -> int:
    """Turn the dequantization cache of every PackedLinear in `model` on or off; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.cache_dequantized = enabled
            m.clear_cache()
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# whole models


def _kind_and_fan_in(module: nn.Module) -> tuple[str, int, int]:
    w = module.weight
    return ("conv" if isinstance(module, nn.Conv2d) else "linear"), w.shape[0], math.prod(w.shape[1:])


def planned_modules(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module, str, nn.Module, LayerPlan]]:
    """Resolve and check every layer of `plan` in `model`: (name, parent, attribute, module, layer plan).

    All problems are reported at once, before anything is changed.
    """
    resolved, problems = [], []
    for name, lp in plan.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name!r}: no such module in the model")
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
            problems.append(
                f"{name!r} is the out_proj of nn.MultiheadAttention {parent_name or '<root>'!r}: MultiheadAttention "
                "reads out_proj.weight directly and never calls the module, so a packed replacement would be "
                "ignored. Leave it out of the plan (the adapter should not list it as quantizable)"
            )
            continue
        if isinstance(module, PackedLinear):
            problems.append(f"{name!r} is already a PackedLinear: quantize the float model, not a quantized one")
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            problems.append(f"{name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d can be quantized")
            continue
        base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
        if type(module).forward is not base.forward:
            problems.append(
                f"{name!r} is a {type(module).__name__} with its own forward(); replacing it would change what it "
                "computes. Leave it out of the plan"
            )
            continue
        kind, out, fan_in = _kind_and_fan_in(module)
        if (kind, out, fan_in) != (lp.kind, lp.out_features, lp.fan_in):
            problems.append(
                f"{name!r}: the plan expects a {lp.kind} of {lp.out_features} rows x {lp.fan_in} inputs, the model "
                f"has a {kind} with weight {tuple(module.weight.shape)} ({out} rows x {fan_in}); the plan was made "
                "for a different model"
            )
            continue
        resolved.append((name, parent, attr, module, lp))
    if problems:
        raise ValueError(f"the plan does not fit this model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return resolved


def quantize_model(
    model: nn.Module, plan: Plan, *, inplace: bool = True, cache_dequantized: bool = False, qparams: dict | None = None
) -> nn.Module:
    """Replace every module named in `plan` by a `PackedLinear` (same attribute name, so its state-dict keys are
    `<name>.qweight_8`, `<name>.scale_8`, ..., `<name>.kept`, `<name>.row_index`, `<name>.bias`), and every table
    named in `plan.embeddings` by a `PackedEmbedding` (`<name>.qweight`, `.scale`, `.zero`, `.kept`) or, at 0 bits,
    a `DroppedEmbedding` (nothing stored).

    The source fingerprint (`fingerprint.model_fingerprint`) is recorded as `model.qvla_source_fingerprint`, so that
    `save_artifact` can name the checkpoint the artifact was made from; it is computed before anything changes.
    qparams: {layer name: (scale, zero)} explicit quantization parameters for some layers (`PackedLinear.from_float`;
    `qvla_quant.llm_baselines.gptq` makes them); the other layers compute theirs from their weights.
    In place, each float layer is freed as soon as it is packed (see the module docstring: peak = the float model +
    one layer's transient); inplace=False quantizes a deep copy (the caller's model and the copy both stay alive).
    """
    qparams = dict(qparams or {})
    unknown = sorted(set(qparams) - set(plan.layers))
    if unknown:
        raise ValueError(f"qparams name layers that are not in the plan: {unknown[:8]}")
    if not inplace:
        model = copy.deepcopy(model)
    # everything is checked before anything changes; the work list keeps no module, so that a replaced float
    # module is released the moment its parent points at the packed one
    work = [("layer", name, parent, attr, lp, _nbytes(module))
            for name, parent, attr, module, lp in planned_modules(model, plan)]  # fmt: skip
    work += [("embedding", name, parent, attr, ep, 0 if ep.bits == PRUNE_BITS else _nbytes(module))
             for name, parent, attr, module, ep in planned_embeddings(model, plan)]  # fmt: skip
    fingerprint = model_fingerprint(model)
    work.sort(key=lambda w: w[-1])  # stable: dropped tables (0) first, then ascending size
    for kind, name, parent, attr, entry, _ in work:
        module = getattr(parent, attr)
        if kind == "layer":
            packed = PackedLinear.from_float(
                module, entry.bits, plan.quant, granularity=entry.granularity, cache_dequantized=cache_dequantized,
                group_size=entry.group_size, grouped=entry.grouped, qparams=qparams.get(name),
            )  # fmt: skip
        else:
            packed = pack_embedding(entry, module, plan.quant.weight)
        del module  # the parent holds the last reference: replacing it frees the float weights
        setattr(parent, attr, packed)
        del packed
    setattr(model, SOURCE_FINGERPRINT_ATTR, fingerprint)
    return model


def _nbytes(module: nn.Module) -> int:
    w = module.weight
    return w.numel() * w.element_size()


def _patch_quant_hook(conv: nn.Conv2d, bits: int):
    """Forward pre-hook: per-patch activation fake quantization of a conv whose patches do not overlap.

    With stride == kernel and no dilation every input pixel belongs to one patch, so quantizing the patches of
    the (zero-padded) input is exactly the per-token quantization of the conv seen as a linear map.
    """
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding

    def hook(module, args):
        x = args[0]
        unbatched = x.dim() == 3
        xb = x.unsqueeze(0) if unbatched else x
        b, c, h, w = xb.shape
        xp = F.pad(xb, (pw, pw, ph, ph))
        nh, nw = (h + 2 * ph) // kh, (w + 2 * pw) // kw
        core = xp[:, :, : nh * kh, : nw * kw].reshape(b, c, nh, kh, nw, kw).permute(0, 2, 4, 1, 3, 5)
        core = fake_quantize_activation(core.reshape(b, nh, nw, c * kh * kw), bits)
        core = core.reshape(b, nh, nw, c, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * kh, nw * kw)
        xq = torch.cat([core, xp[:, :, : nh * kh, nw * kw :]], dim=3)
        xq = torch.cat([xq, xp[:, :, nh * kh :, :]], dim=2)[:, :, ph : ph + h, pw : pw + w]
        return (xq.squeeze(0) if unbatched else xq, *args[1:])

    return hook


def _token_quant_hook(bits: int):
    def hook(module, args):
        return (fake_quantize_activation(args[0], bits), *args[1:])

    return hook


def fake_quantize_model(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """The reference: a copy of `model` (or `model` itself with inplace=True) whose planned layers keep their
    module type but hold fake-quantized weights (`fake_quantize_weight`; pruned rows zero, bias kept), and whose
    planned embeddings hold their tables as a PackedEmbedding looks them up (`fake_quantize_rows` at the entry's
    bits; a table that is not stored is zeroed, so that a read of it shows).

    With A8 in `plan.quant`, a forward pre-hook fake-quantizes the input of each planned layer per token
    (a conv: per patch; only non-overlapping patch convs, stride == kernel_size and dilation 1, are supported).
    The hooks are part of the returned model's semantics; their handles are in `module.qvla_act_hook`.
    """
    if not inplace:
        model = copy.deepcopy(model)
    resolved = planned_modules(model, plan)
    embeddings = planned_embeddings(model, plan)
    act_bits = plan.quant.activation.bits
    if act_bits == 8:
        for name, _, _, module, _ in resolved:
            if isinstance(module, nn.Conv2d) and (
                module.stride != module.kernel_size
                or module.dilation != (1, 1)
                or module.groups != 1
                or isinstance(module.padding, str)
                or module.padding_mode != "zeros"
            ):
                raise NotImplementedError(
                    f"{name!r}: the A8 fake-quant reference supports only patch-embedding convs (stride == "
                    "kernel_size, dilation 1, groups 1, int zero padding); use the packed model (quantize_model)"
                )
    with torch.no_grad():
        for _, _, _, module, lp in resolved:
            w_hat = fake_quantize_weight(
                module.weight, lp.bits, plan.quant.weight, granularity=lp.granularity, group_size=lp.group_size,
                grouped=lp.grouped,
            )  # fmt: skip
            module.weight.copy_(w_hat)
        for _, _, _, module, ep in embeddings:
            w = module.weight
            if ep.bits == PRUNE_BITS:
                w.zero_()
            elif ep.bits == KEEP_BITS:
                w.copy_(fake_quantize_rows(w, KEEP_BITS))
            else:  # block by block, as PackedEmbedding.from_float (the same codes as the whole table at once)
                block = max(1, QUANTIZE_BLOCK_BYTES // (4 * w.shape[1]))
                for r0 in range(0, w.shape[0], block):
                    w[r0 : r0 + block] = fake_quantize_rows(w[r0 : r0 + block], ep.bits, plan.quant.weight)
    if act_bits == 8:
        for _, _, _, module, _ in resolved:
            old = getattr(module, "qvla_act_hook", None)
            if old is not None:
                old.remove()
            if isinstance(module, nn.Conv2d):
                hook = _patch_quant_hook(module, act_bits)
            else:
                hook = _token_quant_hook(act_bits)
            module.qvla_act_hook = module.register_forward_pre_hook(hook)
    return model


def packed_layers(model: nn.Module) -> Iterable[tuple[str, PackedLinear]]:
    """(name, PackedLinear) for every packed layer of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]


def set_kernels(model: torch.nn.Module, mode: str | None) -> int:
    """Set the `kernels` override of every PackedLinear in `model` (None: back to $QVLA_KERNELS / auto); returns
    the number of layers set."""
    if mode is not None:
        kernels.kernel_mode(mode)
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.kernels = mode
            m.clear_kernel_layout()
            n += 1
    return n
