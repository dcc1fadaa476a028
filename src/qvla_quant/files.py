"""The file names of what qvla_quant writes, in one place (no torch import here: only names and a JSON read).

An artifact directory (`qvla_quant.artifact`) holds ARTIFACT_FILE (the manifest), PLAN_FILE, TENSORS_FILE and,
when given, CONFIG_FILE. A float checkpoint (`qvla_quant.checkpoint`) holds CONFIG_FILE and TENSORS_FILE.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ARTIFACT_FILE = "artifact.json"
PLAN_FILE = "plan.json"
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether `path` is a qvla_quant artifact directory (it has the manifest `qvla_quant.save` writes)."""
    return (Path(path).expanduser() / ARTIFACT_FILE).is_file()


def recorded_source(path: str | os.PathLike) -> str:
    """The float policy an artifact was made from, as its manifest records it (`extra.policy_source`); '' when the
    directory is no artifact, the manifest cannot be read, or it records none. Unchecked: `qvla_quant.artifact`
    validates manifests; this is for messages and defaults."""
    try:
        manifest = json.loads((Path(path).expanduser() / ARTIFACT_FILE).read_text())
        return str(manifest.get("extra", {}).get("policy_source", "") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read 16 MiB at a time (artifact checksums, benchmark cache keys)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()
