"""The quantized-policy artifact: a directory anyone can load without the calibration code, and never with pickle.

    plan.json          the Plan (bits per row per layer, quantizer settings, budget, source fingerprint, version)
    model.safetensors  every tensor of the quantized model: the PackedLinear buffers (layout: qvla_quant.packed)
                       and all other parameters and buffers (non-persistent buffers too, so that a skeleton built
                       on the meta device comes back complete); tied tensors are stored once
    artifact.json      format versions, adapter name, model config, source fingerprint and parameter structure,
                       tied-tensor aliases, a summary (bits per role, pruned fraction, bytes before/after)
    config.json        the source model's config, when given (what transformers-style tools expect)

Loading (`load_artifact`) takes a skeleton of the source model (same class, config and dtype, weights not
needed: build it under `torch.device("meta")`), checks its parameter structure against the artifact's, swaps the
planned layers for PackedLinear and assigns the stored tensors with `load_state_dict(..., assign=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qvla_quant.packed import (
    PACKED_FORMAT_VERSION,
    SOURCE_FINGERPRINT_ATTR,
    ConvGeometry,
    PackedLinear,
    packed_layers,
    planned_modules,
    quantize_model,
)
from qvla_quant.plan import Plan

ARTIFACT_FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
TENSORS_FILE = "model.safetensors"
ARTIFACT_FILE = "artifact.json"
CONFIG_FILE = "config.json"
FINGERPRINT_SAMPLE_BYTES = 4096  # per tensor, from each end


class ArtifactError(ValueError):
    """An artifact directory that cannot be used: missing/corrupt file, version, or model mismatch."""


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _source_parameters(
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
            entries.append((prefix + "weight", mod, None, list(mod.weight_shape), _dtype_name(mod.source_dtype)))
            if mod.bias is not None:
                entries.append((prefix + "bias", mod, mod.bias, [mod.out_features], _dtype_name(mod.bias.dtype)))
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            entries.append((prefix + p_name, None, p, list(p.shape), _dtype_name(p.dtype)))
    return sorted(entries, key=lambda e: e[0])


def model_structure(model: nn.Module) -> list[list]:
    """[[name, shape, dtype], ...] of the source model's parameters (see `_source_parameters`)."""
    return [[name, shape, dtype] for name, _, _, shape, dtype in _source_parameters(model)]


def _sample_bytes(t: torch.Tensor, nbytes: int) -> bytes:
    flat = t.detach().reshape(-1)
    n = max(1, nbytes // flat.element_size())
    parts = [flat[:n], flat[-n:]] if flat.numel() > 2 * n else [flat]
    return b"".join(p.contiguous().cpu().view(torch.uint8).numpy().tobytes() for p in parts)


def model_fingerprint(model: nn.Module) -> dict:
    """Identify a source model cheaply.

    structure: sha256 of the names, shapes and dtypes of all parameters (what a skeleton must match to load).
    weights: sha256 of the first and last 4 KiB of every parameter's bytes: tells checkpoints of one architecture
    apart at the cost of reading ~8 KiB per tensor (a sample, not a checksum of every byte). None when the
    weights are not available (meta device, or a quantized model that did not record its source).
    """
    entries = _source_parameters(model)
    structure = hashlib.sha256(json.dumps(model_structure(model)).encode()).hexdigest()
    weights = None
    has_packed = any(packed is not None for _, packed, _, _, _ in entries)
    if has_packed:
        recorded = getattr(model, SOURCE_FINGERPRINT_ATTR, None)
        if isinstance(recorded, dict) and recorded.get("structure") == structure:
            weights = recorded.get("weights")
    elif not any(t is not None and t.is_meta for _, _, t, _, _ in entries):
        h = hashlib.sha256()
        for name, _, t, shape, dtype in entries:
            h.update(f"{name}|{shape}|{dtype}|".encode())
            if t.numel():
                h.update(_sample_bytes(t, FINGERPRINT_SAMPLE_BYTES))
        weights = h.hexdigest()
    n_params = sum(int(torch.Size(shape).numel()) for _, _, _, shape, _ in entries)
    return {"structure": structure, "weights": weights, "n_tensors": len(entries), "n_parameters": n_params}


def fingerprint_id(fingerprint: dict) -> str:
    """Short text form for `Plan.model_fingerprint`: "<structure[:16]>-<weights[:16] or 'noweights'>"."""
    return f"{fingerprint['structure'][:16]}-{(fingerprint.get('weights') or 'noweights')[:16]}"


# ---------------------------------------------------------------------------------------------------------------
# saving


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written artifact file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def _tensors_for_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors to store, tied aliases {alias: stored name}, names of non-persistent buffers)."""
    named = dict(model.state_dict(keep_vars=False).items())
    nonpersistent = []
    for mod_name, mod in model.named_modules():
        for b_name in sorted(mod._non_persistent_buffers_set):
            buf = mod._buffers.get(b_name)
            if buf is not None:
                name = f"{mod_name}.{b_name}" if mod_name else b_name
                named[name] = buf
                nonpersistent.append(name)
    tensors, aliases, seen = {}, {}, {}
    for name, t in named.items():
        t = t.detach()
        if t.is_meta:
            raise ArtifactError(f"cannot save {name!r}: it is on the meta device (the model was never loaded)")
        # safetensors refuses tensors that share memory: store a tied tensor once and record the alias
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    # a partial overlap (views of one storage that are not the same view) is copied so that each stands alone
    by_storage: dict[int, list[str]] = {}
    for name, t in tensors.items():
        if t.numel():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    for names in by_storage.values():
        for name in names[1:]:
            tensors[name] = tensors[name].clone()
    return {n: t.to("cpu").contiguous() for n, t in tensors.items()}, aliases, nonpersistent


def _summary(qmodel: nn.Module, plan: Plan) -> dict:
    layers = dict(packed_layers(qmodel))
    before = sum(m.out_features * m.in_features * m.kept.element_size() for m in layers.values())
    after = sum(m.weight_bytes() for m in layers.values())
    biases = sum(m.bias_bytes() for m in layers.values())
    # every other parameter, counted once even when tied (PackedLinear holds buffers, no parameters)
    others = sum(p.numel() * p.element_size() for p in qmodel.parameters())
    roles = plan.roles()
    return {
        "method": plan.method,
        "budget": plan.budget,
        "average_bits": plan.average_bits(),
        "average_bits_by_role": {r: plan.average_bits(r) for r in roles},
        "pruned_fraction": plan.pruned_fraction(),
        "pruned_fraction_by_role": {r: plan.pruned_fraction(r) for r in roles},
        "activation_bits": plan.quant.activation.bits,
        "quantized_layers": len(layers),
        "quantized_weight_bytes_before": before,
        "quantized_weight_bytes_after": after,
        "quantized_bias_bytes": biases,
        "parameter_bytes_before": others + biases + before,
        "parameter_bytes_after": others + biases + after,
    }


def save_artifact(
    directory: str | os.PathLike,
    model: nn.Module,
    plan: Plan,
    *,
    model_config: dict | None = None,
    adapter: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the artifact of `model` quantized by `plan` into `directory` (created if needed); returns its path.

    `model` is either the float source model (it is quantized into a copy; the caller's model is untouched) or
    the model returned by `quantize_model(model, plan)`. `model_config` (JSON-serializable) is what a loader
    needs to rebuild the skeleton; `adapter` names the policy adapter; `extra` is stored as is.
    """
    directory = Path(directory)
    if any(True for _ in packed_layers(model)):
        qmodel = model
        packed = dict(packed_layers(qmodel))
        problems = [f"{n!r} is in the plan but not packed" for n in plan.layers if n not in packed]
        problems += [f"{n!r} is packed but not in the plan" for n in packed if n not in plan.layers]
        problems += [
            f"{n!r} is packed with other row bit-widths than the plan's"
            for n, m in packed.items()
            if n in plan.layers and not torch.equal(m.row_bits(), plan.layers[n].bits_tensor())
        ]
        if problems:
            raise ArtifactError(
                "the model was not quantized with this plan:\n  "
                + "\n  ".join(problems[:20])
                + "\nPass the float model (save_artifact quantizes it) or the output of quantize_model(model, plan)"
            )
    else:
        qmodel = quantize_model(model, plan, inplace=False)
    fingerprint = model_fingerprint(qmodel)
    structure = model_structure(qmodel)
    if not plan.model_fingerprint:
        plan = dataclasses.replace(plan, model_fingerprint=fingerprint_id(fingerprint))
    tensors, aliases, nonpersistent = _tensors_for_file(qmodel)

    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "qvla_artifact_version": str(ARTIFACT_FORMAT_VERSION),
        "qvla_packed_version": str(PACKED_FORMAT_VERSION),
        "plan_hash": plan.hash(),
    }
    _write_atomic(directory / TENSORS_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))
    _write_atomic(directory / PLAN_FILE, lambda p: p.write_text(plan.to_json() + "\n"))
    if model_config is not None:
        _write_json(directory / CONFIG_FILE, model_config)
    _write_json(
        directory / ARTIFACT_FILE,
        {
            "format_version": ARTIFACT_FORMAT_VERSION,
            "packed_format_version": PACKED_FORMAT_VERSION,
            "library": "qvla_quant",
            "adapter": adapter,
            "plan_hash": plan.hash(),
            "tensors_sha256": _sha256_file(directory / TENSORS_FILE),
            "model_config": model_config,
            "source_fingerprint": fingerprint,
            "summary": _summary(qmodel, plan),
            "tied_tensors": aliases,
            "nonpersistent_buffers": nonpersistent,
            "extra": extra or {},
            "source_structure": structure,
        },
    )
    return directory


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_json(directory: Path, name: str) -> dict:
    path = directory / name
    if not path.is_file():
        what = "a directory" if path.parent.is_dir() else "no directory"
        raise FileNotFoundError(
            f"{path}: file not found ({path.parent} is {what}); a qvla_quant artifact holds "
            f"{PLAN_FILE}, {TENSORS_FILE} and {ARTIFACT_FILE} written by save_artifact"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the file is corrupt: re-save the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object; the file is corrupt: re-save the artifact")
    return data


def read_plan(directory: str | os.PathLike) -> Plan:
    """The Plan stored in an artifact directory (no tensors are read)."""
    directory = Path(directory)
    data = _read_json(directory, PLAN_FILE)
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ArtifactError(f"{directory / PLAN_FILE} is not a valid plan: {detail}") from None


def _read_manifest(directory: Path) -> dict:
    manifest = _read_json(directory, ARTIFACT_FILE)
    version = manifest.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{directory / ARTIFACT_FILE}: artifact format version {version!r} is not supported by this "
            f"qvla_quant (reads version {ARTIFACT_FORMAT_VERSION}); re-save it with this version"
        )
    if manifest.get("packed_format_version") != PACKED_FORMAT_VERSION:
        raise ArtifactError(
            f"{directory / ARTIFACT_FILE}: packed layout version {manifest.get('packed_format_version')!r} "
            f"is not supported (reads version {PACKED_FORMAT_VERSION}); re-save the artifact with this version"
        )
    for key in ("plan_hash", "source_structure", "source_fingerprint"):
        if key not in manifest:
            raise ArtifactError(f"{directory / ARTIFACT_FILE} lacks {key!r}; the file is corrupt: re-save the artifact")
    return manifest


def artifact_summary(directory: str | os.PathLike) -> dict:
    """What an artifact holds, from its JSON files only (no tensors are read)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    plan = read_plan(directory)
    files = {
        name: (directory / name).stat().st_size
        for name in (PLAN_FILE, TENSORS_FILE, ARTIFACT_FILE, CONFIG_FILE)
        if (directory / name).is_file()
    }
    return {
        "directory": str(directory),
        "format_version": manifest["format_version"],
        "adapter": manifest.get("adapter"),
        "plan_hash": manifest["plan_hash"],
        "source_fingerprint": manifest["source_fingerprint"],
        "layers": len(plan.layers),
        "roles": plan.roles(),
        **manifest.get("summary", {}),
        "file_bytes": files,
    }


def _structure_diff(skeleton: list[list], stored: list[list], limit: int = 12) -> str:
    have = {name: (shape, dtype) for name, shape, dtype in skeleton}
    want = {name: (shape, dtype) for name, shape, dtype in stored}
    lines = []
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    changed = [n for n in want if n in have and have[n] != want[n]]
    if missing:
        lines.append(f"in the artifact but not in the skeleton ({len(missing)}): " + ", ".join(missing[:limit]))
    if extra:
        lines.append(f"in the skeleton but not in the artifact ({len(extra)}): " + ", ".join(extra[:limit]))
    for n in changed[:limit]:
        (hs, hd), (ws, wd) = have[n], want[n]
        lines.append(f"{n}: skeleton {hd} {hs}, artifact {wd} {ws}")
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more differing tensors")
    return "\n  ".join(lines)


def _describe(t: torch.Tensor) -> str:
    return f"{_dtype_name(t.dtype)} [{', '.join(str(d) for d in t.shape)}]"


def _first(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _refuse_pickles(directory: Path, path: Path) -> None:
    """An artifact is read with safetensors only: a pickle in its place, or beside it, is refused unread."""
    from qvla_quant.checkpoint import pickle_files, sniff_payload

    kind = sniff_payload(path)
    if kind is not None:
        raise ArtifactError(
            f"{path} holds a {kind} payload, not safetensors; it was not loaded (qvla_quant never unpickles): "
            "the file was replaced: copy the artifact again or re-save it"
        )
    pickles = pickle_files(directory)
    if pickles:
        raise ArtifactError(
            f"{pickles[0]} is a pickle-based weights file in the artifact {directory}, which save_artifact never "
            f"writes; it was not loaded (qvla_quant never unpickles): remove {', '.join(p.name for p in pickles)}"
        )


def load_artifact(
    directory: str | os.PathLike,
    model_skeleton: nn.Module,
    *,
    device: str | torch.device = "cpu",
    cache_dequantized: bool = False,
    verify_checksum: bool = True,
) -> nn.Module:
    """Load an artifact into `model_skeleton` (modified in place and returned, in eval mode).

    The skeleton is the source architecture with the source dtype; its weights are not read (build it on the
    meta device to avoid materializing a large model). Tensors are read with safetensors only.
    verify_checksum: compare the sha256 of model.safetensors with the one recorded at saving (catches damaged
    or swapped files; reads the file once more, ~1 s per GB).
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    plan = read_plan(directory)
    if plan.hash() != manifest["plan_hash"]:
        raise ArtifactError(
            f"{directory / PLAN_FILE} does not match {directory / ARTIFACT_FILE} (plan hash {plan.hash()} vs "
            f"{manifest['plan_hash']}): plan.json was edited or comes from another artifact; re-save the artifact"
        )
    if any(True for _ in packed_layers(model_skeleton)):
        raise ArtifactError("the skeleton already holds PackedLinear layers: load into a fresh float skeleton")

    skeleton_structure = model_structure(model_skeleton)
    if skeleton_structure != manifest["source_structure"]:
        adapter = manifest.get("adapter")
        raise ArtifactError(
            f"the model skeleton does not match the artifact in {directory}:\n  "
            + _structure_diff(skeleton_structure, manifest["source_structure"])
            + "\nBuild the skeleton from the artifact's model config (artifact.json 'model_config'"
            + (f", adapter {adapter!r}" if adapter else "")
            + ") in the same dtype, e.g. under `with torch.device('meta'):`"
        )
    try:
        resolved = planned_modules(model_skeleton, plan)
    except ValueError as e:
        raise ArtifactError(f"{directory / PLAN_FILE} does not fit the skeleton: {e}") from None

    path = directory / TENSORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; the artifact is incomplete: re-save it")
    _refuse_pickles(directory, path)
    if verify_checksum and manifest.get("tensors_sha256") not in (None, _sha256_file(path)):
        raise ArtifactError(
            f"{path} does not have the checksum recorded in {directory / ARTIFACT_FILE}: the file was damaged or "
            "replaced after saving; copy it again or re-save the artifact"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read as safetensors ({e}); the file is corrupt: re-save it") from None
    if metadata.get("plan_hash") != manifest["plan_hash"]:
        raise ArtifactError(f"{path} belongs to another plan than {directory / PLAN_FILE}: re-save the artifact")

    for alias, name in manifest.get("tied_tensors", {}).items():
        if name not in tensors:
            raise ArtifactError(f"{path} lacks {name!r} (tied to {alias!r}); the file is incomplete: re-save it")
        tensors[alias] = tensors[name]
    nonpersistent = {n: tensors.pop(n) for n in manifest.get("nonpersistent_buffers", []) if n in tensors}

    for _, parent, attr, module, lp in resolved:
        packed = PackedLinear(
            module.weight.shape,
            lp.bits,
            plan.quant,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            granularity=lp.granularity,
            conv=ConvGeometry.from_module(module) if isinstance(module, nn.Conv2d) else None,
            device="meta",
            cache_dequantized=cache_dequantized,
        )
        setattr(parent, attr, packed)

    expected = model_skeleton.state_dict()
    missing = [f"{k} {_describe(v)}" for k, v in expected.items() if k not in tensors]
    unexpected = [f"{k} {_describe(t)}" for k, t in tensors.items() if k not in expected]
    wrong = [
        f"{k}: file {_describe(tensors[k])}, expected {_describe(v)}"
        for k, v in expected.items()
        if k in tensors and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)
    ]
    if missing or unexpected or wrong:
        parts = [f"missing ({len(missing)}): {_first(missing)}"] if missing else []
        parts += [f"unexpected ({len(unexpected)}): {_first(unexpected)}"] if unexpected else []
        parts += [f"wrong shape or dtype ({len(wrong)}): {_first(wrong)}"] if wrong else []
        raise ArtifactError(
            f"{path} does not hold the tensors the plan and skeleton need:\n  "
            + "\n  ".join(parts)
            + "\nThe file was edited or comes from another artifact: copy the artifact again or re-save it"
        )
    model_skeleton.load_state_dict(tensors, strict=True, assign=True)

    for name, t in nonpersistent.items():
        mod_name, _, b_name = name.rpartition(".")
        mod = model_skeleton.get_submodule(mod_name) if mod_name else model_skeleton
        if b_name not in mod._buffers:
            raise ArtifactError(f"{path} holds buffer {name!r} that the skeleton does not have")
        mod._buffers[b_name] = t

    still_meta = [n for n, t in (*model_skeleton.named_parameters(), *model_skeleton.named_buffers()) if t.is_meta]
    if still_meta:
        raise ArtifactError(
            f"after loading {path}, these tensors are still on the meta device (neither stored nor built by the "
            f"skeleton): {', '.join(still_meta[:12])}"
        )
    for name, _, _, _, _ in resolved:
        layer = model_skeleton.get_submodule(name)
        try:
            layer.validate()
        except ValueError as e:
            raise ArtifactError(f"{path}: layer {name!r}: {e}") from None
        if not torch.equal(layer.row_bits(), plan.layers[name].bits_tensor()):
            raise ArtifactError(f"{path}: layer {name!r} is stored with other row bit-widths than {PLAN_FILE} says")
    setattr(model_skeleton, SOURCE_FINGERPRINT_ATTR, manifest["source_fingerprint"])
    return model_skeleton.eval()
