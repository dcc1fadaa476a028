"""qvla_quant: action-centric, channel-wise mixed-precision quantization of VLA policies (QVLA). No ROS imports.

    from qvla_quant import calibrate, allocate, quantize, save, load, CalibrationConfig, AllocationConfig

    sens = calibrate(adapter, batches, CalibrationConfig(...))     action-space sensitivities (resumable)
    plan = allocate(sens, budget=4.0)                               bits per row under an average-bit budget
    quantize(adapter, plan); save("artifact/", adapter, plan)       packed int8/int4/int2 rows, safetensors
    adapter = load("artifact/")                                     the robot side: no calibration inputs needed

Everything is imported plainly. Importing the whole package costs ~0.3 s on top of torch's ~1.6 s on the CI
machine (`python -X importtime`), so a separate light load path would buy the robot nothing measurable.
"""

from __future__ import annotations

from qvla_quant.adapters import GenericAdapter, Pi0Adapter, PolicyAdapter
from qvla_quant.allocation import BudgetError
from qvla_quant.api import allocate, calibrate, load, load_policy, quantize, save
from qvla_quant.config import ActivationQuantConfig, AllocationConfig, CalibrationConfig, QuantConfig, WeightQuantConfig
from qvla_quant.llm_baselines import (
    BaselineResult,
    InputGroup,
    awq,
    gptq,
    module_wise,
    module_wise_plan,
    run_baseline,
    smoothquant,
)
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.roles import PlanTemplate
from qvla_quant.sensitivity import cumulative_sensitivity
from qvla_quant.sensitivity_store import Sensitivity

__all__ = [
    "ActivationQuantConfig",
    "AllocationConfig",
    "BaselineResult",
    "BudgetError",
    "CalibrationConfig",
    "GenericAdapter",
    "InputGroup",
    "LayerPlan",
    "Pi0Adapter",
    "Plan",
    "PlanTemplate",
    "PolicyAdapter",
    "QuantConfig",
    "Sensitivity",
    "WeightQuantConfig",
    "allocate",
    "awq",
    "calibrate",
    "cumulative_sensitivity",
    "gptq",
    "load",
    "load_policy",
    "module_wise",
    "module_wise_plan",
    "quantize",
    "run_baseline",
    "save",
    "smoothquant",
]
