"""Strict loading of float checkpoints in transformers' format: every tensor present, nothing extra, never pickle.

transformers' `from_pretrained` initializes missing weights at random and drops unexpected ones with a warning,
and without `use_safetensors=True` it hands a `pytorch_model.bin` to `torch.load`. A robot must not run a policy
whose action expert was initialized at random, so every loader of a float checkpoint (the quantizer's adapters,
the policy runtime, the CLIs) goes through `load_pretrained_strict`, which refuses, naming the file:

    - a pickle file (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.pkl`) in the directory, or a pickle / torch.save
      payload written under the name model.safetensors (never unpickled: only its first bytes are read)
    - a directory that looks like a qvla_quant artifact (plan.json, packed tensors) whose artifact.json is missing
    - a truncated or corrupt model.safetensors
    - missing, unexpected or wrongly shaped tensors (with the expected shapes), and integer/bool tensors where
      the model has floating-point ones (a float checkpoint of another width is cast to the requested dtype)

Tied weights that transformers legitimately leaves out of the file are not reported missing (transformers does
not list them in `missing_keys`).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from qvla_quant.files import ARTIFACT_FILE, PLAN_FILE, TENSORS_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LIST_LIMIT = 12  # names listed per kind of problem; the rest are counted
# PackedLinear buffer names (qvla_quant.packed): a file holding them is a quantized artifact, not a float model
PACKED_TENSOR_NAME = re.compile(r"(^|\.)(qweight_[248]|row_index)$")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as the model it claims to be."""


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _listed(items: list[str], limit: int = LIST_LIMIT) -> str:
    items = sorted(items)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def sniff_payload(path: str | os.PathLike) -> str | None:
    """'pickle' or 'torch.save zip' when the file starts like one, else None (reads the first bytes only)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "torch.save zip (pickle inside)"
    return None


def pickle_files(directory: str | os.PathLike) -> list[Path]:
    """Files in `directory` (not recursive) that are pickle-based weights by name."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, list[int]]], dict]:
    """({tensor name: (dtype, shape)}, metadata) of a safetensors file, reading no tensor data.

    Refuses (CheckpointError naming the file) a pickle payload under a safetensors name, and a truncated or
    corrupt file (safetensors checks that the header is complete and that the data covers every tensor).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    kind = sniff_payload(path)
    if kind is not None:
        raise CheckpointError(
            f"{path} holds a {kind} payload, not safetensors; it was not loaded (qvla never unpickles weights): "
            "convert the checkpoint to safetensors (safetensors.torch.save_file) from a trusted copy"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            header = {}
            for name in f.keys():
                sl = f.get_slice(name)
                header[name] = (str(sl.get_dtype()), list(sl.get_shape()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} cannot be read as safetensors ({' '.join(str(e).split())}): the file is truncated or corrupt; "
            "copy it again or re-save the checkpoint"
        ) from None
    return header, metadata


def looks_like_artifact(directory: Path, header: dict | None = None, metadata: dict | None = None) -> bool:
    if (directory / PLAN_FILE).is_file():
        return True
    if metadata and ("qvla_artifact_version" in metadata or "plan_hash" in metadata):
        return True
    return bool(header) and any(PACKED_TENSOR_NAME.search(name) for name in header)


def check_checkpoint_dir(directory: str | os.PathLike, tensors_file: str = TENSORS_FILE):
    """Validate a float checkpoint directory's files before anything is loaded; returns (header, metadata) of
    its safetensors file (see `read_safetensors_header`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    pickles = pickle_files(directory)
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise CheckpointError(
            f"{pickles[0]} is a pickle-based weights file ({names} in {directory}); qvla loads weights only from "
            f"safetensors and never unpickles them: convert it to {tensors_file} from a trusted copy and remove "
            f"{names}"
        )
    path = directory / tensors_file
    if not path.is_file():
        if looks_like_artifact(directory):
            raise _artifact_without_manifest(directory)
        raise CheckpointError(f"{path}: file not found (a checkpoint directory holds config.json and {tensors_file})")
    header, metadata = read_safetensors_header(path)
    if looks_like_artifact(directory, header, metadata):
        raise _artifact_without_manifest(directory)
    return header, metadata


def _artifact_without_manifest(directory: Path) -> CheckpointError:
    return CheckpointError(
        f"{directory} looks like a qvla_quant artifact but {directory / ARTIFACT_FILE} is missing (plan.json or "
        "packed tensors are there): it cannot be loaded as a float model; copy the artifact again or re-save it "
        "with qvla_quant.save"
    )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs a load report table and draws progress bars; the problems are raised here instead."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _header_shape(header: dict, name: str) -> list[int] | None:
    if name in header:
        return header[name][1]
    matches = [k for k in header if k.endswith("." + name)]
    return header[matches[0]][1] if len(matches) == 1 else None


def load_pretrained_strict(
    model_cls,
    directory: str | os.PathLike,
    *,
    config=None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """`model_cls.from_pretrained(directory)` from local safetensors only, refusing any missing, unexpected or
    mismatched tensor (CheckpointError naming the file, the tensors and their expected shapes)."""
    directory = Path(directory)
    header, _ = check_checkpoint_dir(directory)
    path = directory / TENSORS_FILE
    kwargs = {} if config is None else {"config": config}
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(directory),
                local_files_only=True,
                dtype=dtype,
                use_safetensors=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,  # mismatches are reported below, with both shapes
            )
    except Exception as e:  # transformers raises OSError/ValueError/RuntimeError/KeyError for damaged files
        raise CheckpointError(
            f"could not load the weights in {path} into {model_cls.__name__} ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); check that config.json and {TENSORS_FILE} come from the same checkpoint"
        ) from None
    expected = model.state_dict()
    problems = []
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        problems.append(
            f"{len(missing)} tensors missing: "
            + _listed([f"{k} {_shape(expected[k].shape)}" if k in expected else k for k in missing])
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        described = []
        for k in unexpected:
            shape = _header_shape(header, k)
            described.append(f"{k} {_shape(shape)}" if shape is not None else k)
        problems.append(f"{len(unexpected)} unexpected tensors: " + _listed(described))
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensors of the wrong shape: "
            + _listed([f"{m[0]} is {_shape(m[1])}, expected {_shape(m[2])}" for m in mismatched])
        )
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(" ".join(str(e).split()) for e in info["error_msgs"][:LIST_LIMIT]))
    if expected and all(t.is_floating_point() for t in expected.values()):
        # transformers casts every stored tensor to `dtype`: an integer or bool tensor would be silently converted
        wrong = [
            f"{k} is {_torch_dtype_name(dt)}"
            for k, (dt, _) in header.items()
            if not getattr(torch, _torch_dtype_name(dt), torch.float32).is_floating_point
        ]
        if wrong:
            problems.append(
                f"{len(wrong)} tensors of a non-floating dtype where the model has floating-point "
                "weights: " + _listed(wrong)
            )
    if problems:
        raise CheckpointError(
            f"{path} does not hold the weights of the {model_cls.__name__} described by {directory / 'config.json'}: "
            + "; ".join(problems)
            + ". Refusing to run with randomly initialized or dropped weights: use the complete checkpoint"
        )
    return model.to(device).eval()


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}  # fmt: skip


def _torch_dtype_name(safetensors_dtype: str) -> str:
    """torch dtype name of a safetensors dtype string ('F32' -> 'float32'); torch-style names pass through."""
    name = _SAFETENSORS_DTYPES.get(safetensors_dtype.upper(), safetensors_dtype.removeprefix("torch."))
    return name if isinstance(getattr(torch, name, None), torch.dtype) else "float32"
