"""qvla_quant: action-centric, channel-wise mixed-precision quantization of VLA policies (QVLA). No ROS imports.

from qvla_quant import calibrate, allocate, quantize, save, load, CalibrationConfig, AllocationConfig

Names are imported on first use (PEP 562), so that a robot that only loads a packed artifact
(`qvla_quant.load`) never imports the calibration code (sensitivity, allocation).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GenericAdapter": "qvla_quant.adapters",
    "Pi0Adapter": "qvla_quant.adapters",
    "PolicyAdapter": "qvla_quant.adapters",
    "load_policy": "qvla_quant.adapters",
    "AllocationConfig": "qvla_quant.allocation",
    "BudgetError": "qvla_quant.allocation",
    "allocate": "qvla_quant.api",
    "calibrate": "qvla_quant.api",
    "load": "qvla_quant.api",
    "quantize": "qvla_quant.api",
    "save": "qvla_quant.api",
    "BaselineResult": "qvla_quant.llm_baselines",
    "InputGroup": "qvla_quant.llm_baselines",
    "awq": "qvla_quant.llm_baselines",
    "gptq": "qvla_quant.llm_baselines",
    "module_wise": "qvla_quant.llm_baselines",
    "module_wise_plan": "qvla_quant.llm_baselines",
    "run_baseline": "qvla_quant.llm_baselines",
    "smoothquant": "qvla_quant.llm_baselines",
    "LayerPlan": "qvla_quant.plan",
    "Plan": "qvla_quant.plan",
    "ActivationQuantConfig": "qvla_quant.quantizer",
    "QuantConfig": "qvla_quant.quantizer",
    "WeightQuantConfig": "qvla_quant.quantizer",
    "PlanTemplate": "qvla_quant.roles",
    "CalibrationConfig": "qvla_quant.sensitivity",
    "Sensitivity": "qvla_quant.sensitivity",
    "cumulative_sensitivity": "qvla_quant.sensitivity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qvla_quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
