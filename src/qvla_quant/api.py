"""The public API: one verb per step, each taking a validated config dataclass.

sens = calibrate(adapter, batches, CalibrationConfig(...))     action-space sensitivities (resumable)
plan = allocate(sens, budget=4.0, config=AllocationConfig())    bits per row under the average-bit budget
model = quantize(adapter, plan)                                 packed mixed-precision layers, in place
save("artifact/", adapter, plan)                                safetensors + JSON, no pickle
adapter = load("artifact/")                                     skeleton from the stored config + weights
adapter = load_policy("dir/")                                   an artifact or a float checkpoint, whichever it is
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from qvla_quant.adapters import ADAPTERS, PolicyAdapter, adapter_class
from qvla_quant.allocation import allocate_plan
from qvla_quant.artifact import ArtifactError, artifact_summary, load_artifact, read_manifest, save_artifact
from qvla_quant.config import AllocationConfig, CalibrationConfig
from qvla_quant.files import ARTIFACT_FILE, is_artifact
from qvla_quant.fingerprint import fingerprint_id_matches
from qvla_quant.plan import Plan
from qvla_quant.sensitivity import calibrate_sensitivity
from qvla_quant.sensitivity_store import Sensitivity
from qvla_quant.transforms import quantize_model


def calibrate(adapter: PolicyAdapter, batches, config: CalibrationConfig | None = None) -> Sensitivity:
    """Per-channel action-space sensitivities of `adapter`'s policy on `batches` (an iterable of model-input dicts).

    With `config.store_dir`, results are written per layer as they finish, and a second call with the same policy,
    data and settings resumes where the first one stopped.
    """
    if not isinstance(adapter, PolicyAdapter):
        raise TypeError(f"calibrate needs a PolicyAdapter (see qvla_quant.adapters), got {type(adapter).__name__}")
    return calibrate_sensitivity(adapter, batches, config or CalibrationConfig())


def allocate(sensitivity: Sensitivity, budget: float, config: AllocationConfig | None = None) -> Plan:
    """Bits per output row under `budget` average bits per weight (see `qvla_quant.allocation`)."""
    if not isinstance(sensitivity, Sensitivity):
        raise TypeError(f"allocate needs a Sensitivity (from calibrate), got {type(sensitivity).__name__}")
    return allocate_plan(sensitivity, budget, config or AllocationConfig())


def with_embeddings(plan: Plan, adapter: PolicyAdapter, bits: int | None) -> Plan:
    """`plan` with the adapter's token-embedding tables planned (`PolicyAdapter.embedding_plans`): the tables the
    policy reads at `bits` (2, 3, 4, 6, 8 or 16 per value), those it never reads not stored; None: `plan` as it is.
    Embedding bits are outside the layers' average-bit budget (the plan reports them apart)."""
    if bits is None:
        return plan
    return dataclasses.replace(plan, embeddings=adapter.embedding_plans(int(bits)))


def _model_of(adapter_or_model) -> nn.Module:
    if isinstance(adapter_or_model, PolicyAdapter):
        return adapter_or_model.model
    if isinstance(adapter_or_model, nn.Module):
        return adapter_or_model
    raise TypeError(f"expected a PolicyAdapter or an nn.Module, got {type(adapter_or_model).__name__}")


def check_plan_source(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan calibrated on another model (architecture or checkpoint), when the plan records its source."""
    if not plan.model_fingerprint:
        return
    matches, have = fingerprint_id_matches(model, plan.model_fingerprint)  # also the sampled ids of older plans
    if not matches:
        what = "architecture" if have.split("-")[0] != plan.model_fingerprint.split("-")[0] else "weights"
        raise ValueError(
            f"the plan was allocated for another model (its {what} differ: plan {plan.model_fingerprint}, model "
            f"{have}); calibrate and allocate on this checkpoint, or pass check_source=False to apply it anyway"
        )


def quantize(adapter_or_model, plan: Plan, *, inplace: bool = True, check_source: bool = True) -> nn.Module:
    """Replace the planned layers by packed mixed-precision layers (`qvla_quant.transforms.quantize_model`).

    With an adapter and inplace=True the adapter's own model is quantized, so the adapter keeps working on it.
    """
    model = _model_of(adapter_or_model)
    if check_source:
        check_plan_source(model, plan)
    return quantize_model(model, plan, inplace=inplace)


def save(path: str | os.PathLike, adapter_or_model, plan: Plan, *, extra: dict | None = None) -> Path:
    """Write an artifact (`qvla_quant.artifact`). With an adapter, its config is stored so that `load` can
    rebuild the skeleton without any other input; the float model is quantized into a copy if not done yet."""
    model = _model_of(adapter_or_model)
    extra = dict(extra or {})
    model_config, adapter_name = None, None
    if isinstance(adapter_or_model, PolicyAdapter):
        config = adapter_or_model.config_dict()
        extra["adapter_config"] = config
        adapter_name = adapter_or_model.name
        model_config = config.get("model_config")
    return save_artifact(path, model, plan, model_config=model_config, adapter=adapter_name, extra=extra)


def load(path: str | os.PathLike, *, model: nn.Module | None = None, device="cpu", **adapter_kwargs) -> PolicyAdapter:
    """Load an artifact written by `save` into a fresh skeleton (rebuilt from the stored adapter config through the
    adapter registry, on the meta device) and return the adapter around the quantized model.

    model: a float skeleton to load into instead (required for the generic adapter, with actions_fn=...).
    A skeleton whose parameters differ from the artifact's source is refused with the differences listed.
    """
    path = Path(path)
    artifact_summary(path)  # validates the directory and its versions before anything is built
    manifest = read_manifest(path)
    adapter_config = (manifest.get("extra") or {}).get("adapter_config")
    if not adapter_config:
        raise ValueError(
            f"{path} was not saved through qvla_quant.save with an adapter, so it does not say how to rebuild the "
            "policy; load it with qvla_quant.artifact.load_artifact(path, skeleton)"
        )
    if not isinstance(adapter_config, dict) or "adapter" not in adapter_config:
        raise ArtifactError(
            f"{path / ARTIFACT_FILE}: 'extra.adapter_config' has no adapter name; the file is "
            "corrupt: re-save the artifact"
        )
    adapter = adapter_class(adapter_config["adapter"]).from_config(adapter_config, model=model, **adapter_kwargs)
    load_artifact(path, adapter.model, device=device)
    return adapter


def load_policy(path: str | os.PathLike, **kwargs) -> PolicyAdapter:
    """Load a policy from a local directory: a qvla_quant artifact (loaded with `load`) or a float checkpoint, with
    the adapter that recognizes its files (`PolicyAdapter.can_load`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"policy checkpoint {str(path)!r} does not exist")
    if is_artifact(path):
        return load(path, **kwargs)
    for cls in ADAPTERS.values():
        if cls.can_load(path):
            return cls.from_pretrained(path, **kwargs)
    raise ValueError(
        f"no adapter recognizes the checkpoint at {str(path)!r} (known: {sorted(ADAPTERS)}); "
        "a π0 checkpoint is a directory with config.json (model_type 'pi0') and safetensors weights"
    )
