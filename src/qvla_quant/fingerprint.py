"""Fingerprints that name a source model: what plans, sensitivity stores and artifacts record, so that one made
for another checkpoint (or architecture) is refused.

structure: sha256 of the names, shapes and dtypes of all parameters (what a skeleton must match to load);
weights: sha256 of every byte of every parameter. A packed model reports the structure and fingerprint of the
float model it was made from (`PackedLinear` keeps the replaced layer's shape and dtype).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from qvla_quant.packed import SOURCE_FINGERPRINT_ATTR, PackedLinear

# how `model_fingerprint` hashes the weights: every byte (format 2), or the first and last 4 KiB of each tensor
# (format 1: what older artifacts, plans and sensitivity stores recorded; a fingerprint without
# "weights_algorithm" is of this kind)
FINGERPRINT_ALGORITHM = "sha256-all-bytes"
LEGACY_FINGERPRINT_ALGORITHM = "sha256-first-last-4KiB"
FINGERPRINT_SAMPLE_BYTES = 4096  # per tensor, from each end (legacy algorithm)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_parameters(
    model: nn.Module,
) -> list[tuple[str, nn.Module | None, torch.Tensor | None, list, str]]:
    """(name, packed layer or None, tensor or None, shape, dtype) of the parameters of the SOURCE model, sorted.

    A PackedLinear reports the weight/bias of the layer it replaced, so a quantized model, its float source and
    an empty skeleton of it all have the same structure. Shared (tied) parameters appear under every name.
    """
    entries = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, PackedLinear):
            entries.append((prefix + "weight", mod, None, list(mod.weight_shape), dtype_name(mod.source_dtype)))
            if mod.bias is not None:
                entries.append((prefix + "bias", mod, mod.bias, [mod.out_features], dtype_name(mod.bias.dtype)))
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            entries.append((prefix + p_name, None, p, list(p.shape), dtype_name(p.dtype)))
    return sorted(entries, key=lambda e: e[0])


def model_structure(model: nn.Module) -> list[list]:
    """[[name, shape, dtype], ...] of the source model's parameters (see `source_parameters`)."""
    return [[name, shape, dtype] for name, _, _, shape, dtype in source_parameters(model)]


def _sample_bytes(t: torch.Tensor, nbytes: int) -> bytes:
    flat = t.detach().reshape(-1)
    n = max(1, nbytes // flat.element_size())
    parts = [flat[:n], flat[-n:]] if flat.numel() > 2 * n else [flat]
    return b"".join(p.contiguous().cpu().view(torch.uint8).numpy().tobytes() for p in parts)


def _hash_all_bytes(h, t: torch.Tensor) -> None:
    """Feed every byte of `t` (row-major, its own dtype) to `h`, 64 MiB at a time (no full copy of a big tensor)."""
    flat = t.detach().reshape(-1)
    step = max(1, (64 << 20) // flat.element_size())
    for start in range(0, flat.numel(), step):
        h.update(flat[start : start + step].contiguous().cpu().view(torch.uint8).numpy().data)


def fingerprint_algorithm(fingerprint: dict) -> str:
    """The algorithm a recorded fingerprint's "weights" was made with (absent key: the legacy sampled one)."""
    return fingerprint.get("weights_algorithm", LEGACY_FINGERPRINT_ALGORITHM)


def model_fingerprint(model: nn.Module, *, algorithm: str = FINGERPRINT_ALGORITHM) -> dict:
    """Identify a source model.

    structure: sha256 of the names, shapes and dtypes of all parameters (what a skeleton must match to load).
    weights: sha256 of every byte of every parameter (algorithm "sha256-all-bytes"; it runs once per quantization
    or save, ~1 s per 2 GB), or with `algorithm=LEGACY_FINGERPRINT_ALGORITHM` of the first and last 4 KiB of each
    (what format-1 artifacts and older plans recorded; only to re-check those). None when the weights are not
    available (meta device, or a quantized model that did not record its source). A quantized model returns
    the fingerprint recorded at quantization, whatever its algorithm ("weights_algorithm" says which).
    """
    if algorithm not in (FINGERPRINT_ALGORITHM, LEGACY_FINGERPRINT_ALGORITHM):
        raise ValueError(f"unknown fingerprint algorithm {algorithm!r}")
    entries = source_parameters(model)
    structure = hashlib.sha256(json.dumps(model_structure(model)).encode()).hexdigest()
    weights = None
    has_packed = any(packed is not None for _, packed, _, _, _ in entries)
    if has_packed:
        recorded = getattr(model, SOURCE_FINGERPRINT_ATTR, None)
        if isinstance(recorded, dict) and recorded.get("structure") == structure:
            weights = recorded.get("weights")
            algorithm = fingerprint_algorithm(recorded)
    elif not any(t is not None and t.is_meta for _, _, t, _, _ in entries):
        h = hashlib.sha256()
        for name, _, t, shape, dtype in entries:
            h.update(f"{name}|{shape}|{dtype}|".encode())
            if not t.numel():
                continue
            if algorithm == FINGERPRINT_ALGORITHM:
                _hash_all_bytes(h, t)
            else:
                h.update(_sample_bytes(t, FINGERPRINT_SAMPLE_BYTES))
        weights = h.hexdigest()
    n_params = sum(int(torch.Size(shape).numel()) for _, _, _, shape, _ in entries)
    fingerprint = {"structure": structure, "weights": weights, "n_tensors": len(entries), "n_parameters": n_params}
    if algorithm != LEGACY_FINGERPRINT_ALGORITHM:  # legacy fingerprints stay exactly as they were recorded
        fingerprint["weights_algorithm"] = algorithm
    return fingerprint


def fingerprint_id_matches(model: nn.Module, fid: str) -> tuple[bool, str]:
    """Whether `fid` (a `fingerprint_id`, e.g. `Plan.model_fingerprint`) names `model`, and the model's own id.

    Ids written before format 2 hashed a sample of the weights: when the full hash does not match, the model is
    hashed again the old way, so plans and sensitivity stores made with an older qvla_quant still apply."""
    have = fingerprint_id(model_fingerprint(model))
    if have == fid:
        return True, have
    legacy = fingerprint_id(model_fingerprint(model, algorithm=LEGACY_FINGERPRINT_ALGORITHM))
    return legacy == fid, have


def fingerprint_id(fingerprint: dict) -> str:
    """Short text form for `Plan.model_fingerprint`: "<structure[:16]>-<weights[:16] or 'noweights'>"."""
    return f"{fingerprint['structure'][:16]}-{(fingerprint.get('weights') or 'noweights')[:16]}"
