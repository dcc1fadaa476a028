"""The quantized-policy artifact: a directory anyone can load without the calibration code, and never with pickle.

    plan.json          the Plan (bits per row per layer, quantizer settings, budget, source fingerprint, version)
    model.safetensors  every tensor of the quantized model: the PackedLinear buffers (layout: qvla_quant.packed),
                       the PackedEmbedding buffers of the tables in plan.embeddings (layout:
                       qvla_quant.packed_embedding; a table at 0 bits is not stored at all) and all other
                       parameters and buffers (non-persistent buffers too, so that a skeleton built
                       on the meta device comes back complete); tied tensors are stored once
    artifact.json      format versions, adapter name, model config, source fingerprint and parameter structure,
                       tied-tensor aliases, a summary (bits per role, pruned fraction, bytes before/after, the
                       stored bits per weight and their per-row overhead; see `_summary`)
    config.json        the source model's config, when given (what transformers-style tools expect)

Versions. Artifact format 2 (written without packed embeddings): the source fingerprint hashes every byte of every
parameter (`model_fingerprint`), the summary holds the stored-bytes fields. Packed layout 3 (written now): layout 2
plus 3- and 6-bit rows (bit planes) and rows with group-wise scales (`qvla_quant.packed`); the plan is written in
plan format 2 only when it uses them. Packed layout 2 (fp32 scales, uint8 zero points, 16-bit kept rows; 2-, 4- and
8-bit rows only) loads with its missing groups empty: the same tensors and outputs. Format-1 artifacts (packed
layout 1, fingerprint of the first and last 4 KiB of each tensor) still load and compute the same outputs; their
summary gains the new fields, computed from the plan with the layout-1 byte formula.

Artifact format 3: an artifact whose plan names embeddings (`Plan.embeddings`: PackedEmbedding tensors, layout
embedding format 1 of `qvla_quant.packed_embedding`, or tables not stored at all) is written as format 3, so that an
older qvla_quant refuses it by its version instead of by a confusing tensor mismatch; its summary adds
"embedding_format_version" and per-table byte fields (`embedding_summary`). Every other artifact is still written
as format 2, byte for byte as before, and formats 1 and 2 load as they did.

Loading (`load_artifact`) takes a skeleton of the source model (same class, config and dtype, weights not
needed: build it under `torch.device("meta")`), checks its parameter structure against the artifact's, swaps the
planned layers for PackedLinear and the planned tables for PackedEmbedding (or, at 0 bits, a DroppedEmbedding that
allocates nothing) and assigns the stored tensors with `load_state_dict(..., assign=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qvla_quant.checkpoint import pickle_files, sniff_payload
from qvla_quant.files import ARTIFACT_FILE, CONFIG_FILE, PLAN_FILE, TENSORS_FILE, file_sha256
from qvla_quant.fingerprint import dtype_name, fingerprint_id, model_structure
from qvla_quant.packed import (
    GROUP_OVERHEAD_BYTES,
    KEPT_ROW_OVERHEAD_BYTES,
    LAYOUT_2_GROUPS,
    PACKED_FORMAT_VERSION,
    PACKED_READ_VERSIONS,
    QUANTIZED_ROW_OVERHEAD_BYTES,
    QUANTIZED_STORAGE,
    SOURCE_FINGERPRINT_ATTR,
    ConvGeometry,
    PackedLinear,
    group_suffix,
    predicted_weight_bytes,
)
from qvla_quant.packed_embedding import (
    EMBEDDING_READ_VERSIONS,
    PackedEmbedding,
    build_embedding,
    embedding_modules,
    embedding_summary,
    is_quantized,
    planned_embeddings,
    source_fingerprint,
    source_structure,
)
from qvla_quant.plan import Plan
from qvla_quant.quantizer import SCALE_DTYPE, ZERO_DTYPE, kept_dtype
from qvla_quant.transforms import packed_layers, planned_modules, quantize_model

ARTIFACT_FORMAT_VERSION = 2  # artifacts without packed embeddings
ARTIFACT_EMBEDDINGS_FORMAT_VERSION = 3  # artifacts with packed (or dropped) embeddings
ARTIFACT_READ_VERSIONS: tuple[int, ...] = (1, 2, 3)


class ArtifactError(ValueError):
    """An artifact directory that cannot be used: missing/corrupt file, version, or model mismatch."""


# ---------------------------------------------------------------------------------------------------------------
# saving


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written artifact file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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


def _bits_fields(plan: Plan, weight_bytes: dict[str, int]) -> dict:
    """Stored bits per weight and their overhead over the plan's average, in total and per role, from the weight
    bytes of every planned layer: overhead = 8 * bytes / weights - plan.average_bits (scales, zero points, row
    index, byte padding; for a format-1 fp32 artifact also the second half of its 32-bit kept rows)."""
    roles = plan.roles()

    def stored(role):
        layers = [n for n, lp in plan.layers.items() if role is None or lp.role == role]
        n = sum(plan.layers[name].n_weights for name in layers)
        return 8.0 * sum(weight_bytes[name] for name in layers) / n if n else float("nan")

    return {
        "average_bits_stored": stored(None),
        "overhead_bits_per_weight": stored(None) - plan.average_bits(),
        "average_bits_stored_by_role": {r: stored(r) for r in roles},
        "overhead_bits_per_weight_by_role": {r: stored(r) - plan.average_bits(r) for r in roles},
    }


def _format_fields(packed_version: int, source_dtypes: set[str]) -> dict:
    """The storage formula the byte counts follow (see `qvla_quant.packed`)."""
    if packed_version >= 2:
        kept = sorted({dtype_name(kept_dtype(getattr(torch, d))) for d in source_dtypes})
        fields = {
            "packed_format_version": packed_version,
            "source_dtype": sorted(source_dtypes),
            "kept_dtype": kept,
            "scale_dtype": dtype_name(SCALE_DTYPE),
            "zero_dtype": dtype_name(ZERO_DTYPE),
            "row_overhead_bytes": {"quantized": QUANTIZED_ROW_OVERHEAD_BYTES, "kept": KEPT_ROW_OVERHEAD_BYTES,
                                   "pruned": 0},
        }  # fmt: skip
        if packed_version >= 3:  # bytes per extra group of a grouped row (counted in the plan's average bits)
            fields["group_overhead_bytes"] = GROUP_OVERHEAD_BYTES
        return fields
    return {
        "packed_format_version": packed_version,
        "source_dtype": sorted(source_dtypes),
        "kept_dtype": sorted(source_dtypes),
        "scale_dtype": "float16",
        "zero_dtype": "float16",
        "row_overhead_bytes": {"quantized": 8, "kept": KEPT_ROW_OVERHEAD_BYTES, "pruned": 0},
    }


def _summary(qmodel: nn.Module, plan: Plan) -> dict:
    """The manifest's summary. Byte fields: quantized_weight_bytes_before (the planned layers' weights in the source
    dtype), _after (as stored, measured on the packed layers), _planned (what the plan implies by the byte formula
    of `qvla_quant.packed`; equal to _after), parameter_bytes_before/_after (every parameter, as the robot holds
    it). Bit fields: average_bits (the plan's: b * K per row) and beside it average_bits_stored and
    overhead_bits_per_weight (`_bits_fields`), in total and per role."""
    layers = dict(packed_layers(qmodel))
    before = sum(m.out_features * m.in_features * m.source_dtype.itemsize for m in layers.values())
    measured = {name: m.weight_bytes() for name, m in layers.items()}
    after = sum(measured.values())
    planned = sum(predicted_weight_bytes(plan.layers[n], m.source_dtype) for n, m in layers.items())
    biases = sum(m.bias_bytes() for m in layers.values())
    # every other parameter, counted once even when tied (PackedLinear and PackedEmbedding hold buffers, no
    # parameters: the tables are counted from their own fields)
    others = sum(p.numel() * p.element_size() for p in qmodel.parameters())
    tables = embedding_summary(qmodel, plan) if plan.embeddings else {}
    others_before = others + tables.get("embedding_bytes_before", 0)
    others_after = others + tables.get("embedding_bytes_after", 0)
    roles = plan.roles()
    return {
        "method": plan.method,
        "budget": plan.budget,
        "average_bits": plan.average_bits(),
        "average_bits_by_role": {r: plan.average_bits(r) for r in roles},
        **_bits_fields(plan, measured),
        "pruned_fraction": plan.pruned_fraction(),
        "pruned_fraction_by_role": {r: plan.pruned_fraction(r) for r in roles},
        "grouped_fraction": plan.grouped_fraction(),
        "group_sizes": sorted({lp.group_size for lp in plan.layers.values() if lp.group_size}),
        "activation_bits": plan.quant.activation.bits,
        "quantized_layers": len(layers),
        "quantized_weight_bytes_before": before,
        "quantized_weight_bytes_after": after,
        "quantized_weight_bytes_planned": planned,
        "quantized_bias_bytes": biases,
        "parameter_bytes_before": others_before + biases + before,
        "parameter_bytes_after": others_after + biases + after,
        **_format_fields(PACKED_FORMAT_VERSION, {dtype_name(m.source_dtype) for m in layers.values()}),
        **tables,
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
    if is_quantized(model):
        qmodel = model
        packed = dict(packed_layers(qmodel))
        problems = [f"{n!r} is in the plan but not packed" for n in plan.layers if n not in packed]
        problems += [f"{n!r} is packed but not in the plan" for n in packed if n not in plan.layers]
        problems += _embedding_problems(qmodel, plan)
        problems += [
            f"{n!r} is packed with other row bit-widths than the plan's"
            for n, m in packed.items()
            if n in plan.layers and not torch.equal(m.row_bits(), plan.layers[n].bits_tensor())
        ]
        problems += [
            f"{n!r} is packed with other grouped rows or group size than the plan's"
            for n, m in packed.items()
            if n in plan.layers
            and (
                not torch.equal(m.row_grouped(), plan.layers[n].grouped_tensor())
                or m.group_size != plan.layers[n].group_size
            )
        ]
        if problems:
            raise ArtifactError(
                "the model was not quantized with this plan:\n  "
                + "\n  ".join(problems[:20])
                + "\nPass the float model (save_artifact quantizes it) or the output of quantize_model(model, plan)"
            )
        legacy = [n for n, m in packed.items() if m.kept.dtype.itemsize > 2]
        if legacy:
            raise ArtifactError(
                f"{len(legacy)} packed layer(s) hold kept rows wider than 16 bits ({_first(legacy)}), the layout of "
                f"format-1 artifacts: packed layout {PACKED_FORMAT_VERSION} stores them as 16-bit floats. Call "
                "qvla_quant.transforms.repack_kept(model) first (it rounds those rows to bf16) or save the float model"
            )
    else:
        qmodel = quantize_model(model, plan, inplace=False)
    fingerprint = source_fingerprint(qmodel)
    structure = source_structure(qmodel)
    if not plan.model_fingerprint:
        plan = dataclasses.replace(plan, model_fingerprint=fingerprint_id(fingerprint))
    tensors, aliases, nonpersistent = _tensors_for_file(qmodel)
    artifact_version = ARTIFACT_EMBEDDINGS_FORMAT_VERSION if plan.embeddings else ARTIFACT_FORMAT_VERSION

    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "qvla_artifact_version": str(artifact_version),
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
            "format_version": artifact_version,
            "packed_format_version": PACKED_FORMAT_VERSION,
            "library": "qvla_quant",
            "adapter": adapter,
            "plan_hash": plan.hash(),
            "tensors_sha256": file_sha256(directory / TENSORS_FILE),
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


def _embedding_problems(qmodel: nn.Module, plan: Plan) -> list[str]:
    """How the packed / dropped tables of a quantized model differ from `plan.embeddings`."""
    tables = dict(embedding_modules(qmodel))
    problems = [f"embedding {n!r} is in the plan but not packed" for n in plan.embeddings if n not in tables]
    problems += [f"embedding {n!r} is packed but not in the plan" for n in tables if n not in plan.embeddings]
    for n, m in tables.items():
        ep, bits = plan.embeddings.get(n), getattr(m, "bits", 0)  # a DroppedEmbedding stores 0 bits
        if ep is not None and (bits, m.weight_shape) != (ep.bits, (ep.num_embeddings, ep.embedding_dim)):
            problems.append(
                f"embedding {n!r} is stored at {bits} bits as {m.weight_shape}, the plan says {ep.bits} "
                f"bits as {(ep.num_embeddings, ep.embedding_dim)}"
            )
    return problems


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


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked contents of `directory`'s artifact.json (versions and required keys), or ArtifactError."""
    directory = Path(directory)
    manifest = _read_json(directory, ARTIFACT_FILE)
    version = manifest.get("format_version")
    if version not in ARTIFACT_READ_VERSIONS:
        raise ArtifactError(
            f"{directory / ARTIFACT_FILE}: artifact format version {version!r} is not supported by this "
            f"qvla_quant (reads versions {', '.join(map(str, ARTIFACT_READ_VERSIONS))}); re-save it with this version"
        )
    if manifest.get("packed_format_version") not in PACKED_READ_VERSIONS:
        raise ArtifactError(
            f"{directory / ARTIFACT_FILE}: packed layout version {manifest.get('packed_format_version')!r} "
            f"is not supported (reads versions {', '.join(map(str, PACKED_READ_VERSIONS))}); re-save the artifact "
            "with this version"
        )
    embedding_version = (manifest.get("summary") or {}).get("embedding_format_version")
    if embedding_version is not None and embedding_version not in EMBEDDING_READ_VERSIONS:
        raise ArtifactError(
            f"{directory / ARTIFACT_FILE}: packed embedding format version {embedding_version!r} is not supported "
            f"(reads versions {', '.join(map(str, EMBEDDING_READ_VERSIONS))}); re-save the artifact with this version"
        )
    for key in ("plan_hash", "source_structure", "source_fingerprint"):
        if key not in manifest:
            raise ArtifactError(f"{directory / ARTIFACT_FILE} lacks {key!r}; the file is corrupt: re-save the artifact")
    return manifest


def _layer_source_dtypes(manifest: dict, plan: Plan) -> dict[str, str]:
    """Source dtype of every planned layer, from the manifest's parameter structure (its `<layer>.weight`)."""
    dtypes = {}
    for name, _, dtype in manifest.get("source_structure", []):
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in plan.layers:
            dtypes[layer] = dtype
    return dtypes


def _summary_for_old_format(manifest: dict, plan: Plan) -> dict:
    """The summary fields that format-1 artifacts lack, from the plan and the layout-1 byte formula (no tensors
    read). Their recorded quantized_weight_bytes_after was measured on the stored layers and equals _planned."""
    version = manifest["packed_format_version"]
    dtypes = _layer_source_dtypes(manifest, plan)
    if set(dtypes) != set(plan.layers):
        return {}
    by_layer = {
        n: predicted_weight_bytes(lp, getattr(torch, dtypes[n]), packed_version=version)
        for n, lp in plan.layers.items()
    }
    return {
        **_bits_fields(plan, by_layer),
        "quantized_weight_bytes_planned": sum(by_layer.values()),
        **_format_fields(version, set(dtypes.values())),
    }


def artifact_layer_dtypes(directory: str | os.PathLike) -> dict[str, str]:
    """{planned layer: source dtype name} of an artifact, from its JSON files (what its byte formula needs)."""
    directory = Path(directory)
    return _layer_source_dtypes(read_manifest(directory), read_plan(directory))


def artifact_summary(directory: str | os.PathLike) -> dict:
    """What an artifact holds, from its JSON files only (no tensors are read).

    Besides the manifest's summary (see `_summary`): format_version, and for a format-1 artifact the stored-bits
    fields it lacks, computed from its plan (`_summary_for_old_format`)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    plan = read_plan(directory)
    files = {
        name: (directory / name).stat().st_size
        for name in (PLAN_FILE, TENSORS_FILE, ARTIFACT_FILE, CONFIG_FILE)
        if (directory / name).is_file()
    }
    summary = dict(manifest.get("summary", {}))
    if manifest["packed_format_version"] != PACKED_FORMAT_VERSION or "average_bits_stored" not in summary:
        summary = {**_summary_for_old_format(manifest, plan), **summary}
    return {
        "directory": str(directory),
        "format_version": manifest["format_version"],
        "adapter": manifest.get("adapter"),
        "plan_hash": manifest["plan_hash"],
        "source_fingerprint": manifest["source_fingerprint"],
        "layers": len(plan.layers),
        "roles": plan.roles(),
        **summary,
        "packed_format_version": manifest["packed_format_version"],
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
    return f"{dtype_name(t.dtype)} [{', '.join(str(d) for d in t.shape)}]"


def _first(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _refuse_pickles(directory: Path, path: Path) -> None:
    """An artifact is read with safetensors only: a pickle in its place, or beside it, is refused unread."""

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


def _repack_layout_1(tensors: dict[str, torch.Tensor], layers: list[str], path: Path) -> None:
    """Packed layout 1 -> 2 in place, exactly: fp16 scales widened to fp32, fp16 integer zero points to uint8.
    (Kept rows stay in the source dtype; tensors of another dtype are left for the loader's dtype check.)"""
    for name in layers:
        for b in LAYOUT_2_GROUPS:
            scale, zero = f"{name}.scale_{b}", f"{name}.zero_{b}"
            if scale in tensors and tensors[scale].dtype == torch.float16:
                tensors[scale] = tensors[scale].to(SCALE_DTYPE)
            if zero in tensors and tensors[zero].dtype == torch.float16:
                z = tensors[zero]
                if z.numel() and not bool(((z == z.round()) & (z >= 0) & (z <= (1 << b) - 1)).all()):
                    raise ArtifactError(
                        f"{path}: {zero} holds zero points that are not integers in [0, {(1 << b) - 1}]; the file "
                        "is corrupt: re-save the artifact"
                    )
                tensors[zero] = z.to(ZERO_DTYPE)


def _add_empty_new_groups(tensors: dict[str, torch.Tensor], name: str, layer: PackedLinear, device) -> None:
    """Layouts 1 and 2 have no 6-, 3-bit or grouped groups: the layer gets them empty, as layout 3 stores an empty
    group (unless the file holds a tensor of that name: then the loader's shape and dtype check speaks)."""
    for c in QUANTIZED_STORAGE:
        if c.bits in LAYOUT_2_GROUPS and not c.grouped:
            continue
        for p in ("qweight", "scale", "zero"):
            key = f"{name}.{p}_{group_suffix(c)}"
            if key not in tensors:
                buf = getattr(layer, f"{p}_{group_suffix(c)}")
                tensors[key] = torch.empty(buf.shape, dtype=buf.dtype, device=device)


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
    meta device to avoid materializing a large model). Tensors are read with safetensors only. A format-1
    artifact loads as described in `qvla_quant.packed` (scales and zero points converted exactly, kept rows as
    stored): its outputs are those it had when saved.
    verify_checksum: compare the sha256 of model.safetensors with the one recorded at saving (catches damaged
    or swapped files; reads the file once more, ~1 s per GB).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    plan = read_plan(directory)
    if plan.hash() != manifest["plan_hash"]:
        raise ArtifactError(
            f"{directory / PLAN_FILE} does not match {directory / ARTIFACT_FILE} (plan hash {plan.hash()} vs "
            f"{manifest['plan_hash']}): plan.json was edited or comes from another artifact; re-save the artifact"
        )
    if plan.embeddings and manifest["format_version"] < ARTIFACT_EMBEDDINGS_FORMAT_VERSION:
        raise ArtifactError(
            f"{directory / PLAN_FILE} names packed embeddings, which artifact format {manifest['format_version']} "
            "cannot hold: the artifact was edited; re-save it"
        )
    if is_quantized(model_skeleton):
        raise ArtifactError("the skeleton already holds packed layers or embeddings: load into a fresh float skeleton")

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
        tables = planned_embeddings(model_skeleton, plan)
    except ValueError as e:
        raise ArtifactError(f"{directory / PLAN_FILE} does not fit the skeleton: {e}") from None

    path = directory / TENSORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; the artifact is incomplete: re-save it")
    _refuse_pickles(directory, path)
    if verify_checksum and manifest.get("tensors_sha256") not in (None, file_sha256(path)):
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
    packed_version = manifest["packed_format_version"]
    if packed_version == 1:
        _repack_layout_1(tensors, [name for name, *_ in resolved], path)
    if packed_version < 3:
        bad = [n for n, lp in plan.layers.items() if lp.uses_new_format]
        if bad:
            raise ArtifactError(
                f"{directory / PLAN_FILE} has 3/6-bit or grouped rows ({_first(bad)}), which packed layout "
                f"{packed_version} cannot hold: the artifact was edited; re-save it"
            )

    for name, parent, attr, module, lp in resolved:
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
            # layout 1 stored the kept rows in the source dtype: they load as stored (same outputs)
            kept_dtype=module.weight.dtype if packed_version == 1 else None,
            group_size=lp.group_size,
            grouped=lp.grouped,
        )
        setattr(parent, attr, packed)
        if packed_version < 3:
            _add_empty_new_groups(tensors, name, packed, device)
    # the tables: empty PackedEmbeddings to be assigned, or DroppedEmbeddings that hold (and allocate) nothing
    for _, parent, attr, module, ep in tables:
        setattr(parent, attr, build_embedding(ep, module, device="meta"))
    # keep names only: a skeleton with real (non-meta) weights frees each replaced float module now
    layer_names, table_names = [r[0] for r in resolved], [t[0] for t in tables]
    del resolved, tables, module

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
    for name in table_names:
        table = model_skeleton.get_submodule(name)
        if isinstance(table, PackedEmbedding):
            try:
                table.validate()
            except ValueError as e:
                raise ArtifactError(f"{path}: embedding {name!r}: {e}") from None
    for name in layer_names:
        layer = model_skeleton.get_submodule(name)
        try:
            layer.validate()
        except ValueError as e:
            raise ArtifactError(f"{path}: layer {name!r}: {e}") from None
        if not torch.equal(layer.row_bits(), plan.layers[name].bits_tensor()):
            raise ArtifactError(f"{path}: layer {name!r} is stored with other row bit-widths than {PLAN_FILE} says")
        if not torch.equal(layer.row_grouped(), plan.layers[name].grouped_tensor()):
            raise ArtifactError(f"{path}: layer {name!r} is stored with other grouped rows than {PLAN_FILE} says")
    setattr(model_skeleton, SOURCE_FINGERPRINT_ATTR, manifest["source_fingerprint"])
    return model_skeleton.eval()
