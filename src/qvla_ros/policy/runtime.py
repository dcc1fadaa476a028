"""The policy runtime: load a π0 policy (full precision or a qvla_quant artifact) and predict action chunks.

    runtime = PolicyRuntime.load("models/sim_transfer_cube_w4", device="cpu")
    chunk = runtime.predict(observation)        # PredictedChunk: [horizon, 14] absolute joint targets

`predict` is deterministic: flow matching starts from one fixed noise tensor drawn from `noise_seed` at load
time (the same noise the quantizer's sensitivity analysis uses), so the same observation always gives the same
chunk and the quantized policy can be compared with the full-precision one step by step.
No ROS here: the policy node runs this in its inference worker; evaluation and calibration use it directly.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

import qvla_quant
from qvla_quant.artifact import artifact_summary
from qvla_quant.files import is_artifact
from qvla_quant.transforms import set_dequantized_cache
from qvla_ros.policy.model import check_model_matches_processor, load_pi0_model
from qvla_ros.policy.processor import Pi0Processor, PolicyFormatError
from qvla_ros.policy.types import Observation, PredictedChunk


def is_quantized_artifact(path: str | Path) -> bool:
    """Whether `path` is a qvla_quant artifact (packed weights) rather than a float policy directory."""
    return is_artifact(path)


class PolicyRuntime:
    def __init__(
        self,
        model,
        processor: Pi0Processor,
        *,
        model_id: str,
        device: str = "cpu",
        noise_seed: int = 0,
        num_steps: int | None = None,
        quantization: dict | None = None,
        source: Path | None = None,
    ):
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.device = torch.device(device)
        self.num_steps = num_steps
        self.source = source
        self._quantization = quantization
        mc = model.config
        self._dtype = (
            next(p for p in model.parameters() if p.is_floating_point()).dtype
            if any(True for _ in model.parameters())
            else torch.float32
        )
        gen = torch.Generator().manual_seed(noise_seed)
        self.noise = torch.randn(1, mc.chunk_size, mc.max_action_dim, generator=gen)
        # one predict at a time per runtime (torch modules are not re-entrant across threads)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        warmup: bool = True,
        noise_seed: int = 0,
        num_steps: int | None = None,
        cache_dequantized: bool = False,
    ) -> PolicyRuntime:
        """Load a policy directory or a qvla_quant artifact.

        cache_dequantized (artifacts only): dequantize the packed rows once and keep them in the compute dtype.
        Same outputs, the speed of the float model, the memory of a float copy of the stored rows; for CPU
        evaluation runs. Off by default: the packed weights are what a memory-bound robot wants.
        """
        path = Path(path)
        if not path.exists():
            raise PolicyFormatError(f"policy path {path} does not exist")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PolicyFormatError(
                f"device {device!r} requested but CUDA is not available on this machine; use device:=cpu"
            )
        processor = Pi0Processor.load(path)
        if is_quantized_artifact(path):
            model, quant = _load_quantized(path, device)
            if cache_dequantized:
                set_dequantized_cache(model, True)
            model_id = f"{path.name}@{quant.get('plan_hash', '')}"
        else:
            model = load_pi0_model(path, device=device)
            quant = None
            model_id = path.name
        check_model_matches_processor(model, processor, path)
        runtime = cls(
            model,
            processor,
            model_id=model_id,
            device=device,
            noise_seed=noise_seed,
            num_steps=num_steps,
            quantization=quant,
            source=path,
        )
        if warmup:
            runtime.warmup()
        return runtime

    # ---------------------------------------------------------------- properties the nodes use
    @property
    def camera_names(self) -> list[str]:
        return list(self.processor.config.camera_names)

    @property
    def joint_names(self) -> list[str]:
        return list(self.processor.config.joint_names)

    @property
    def horizon(self) -> int:
        return int(self.model.config.chunk_size)

    @property
    def step_period(self) -> float:
        return self.processor.config.step_period

    # ---------------------------------------------------------------- inference
    def model_inputs(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        batch = self.processor.batch(observations)
        return {
            k: (v.to(self.device, self._dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in batch.items()
        }

    @torch.no_grad()
    def sample_model_actions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalized model-space actions [B, H, max_action_dim] from the fixed noise."""
        b = batch["state"].shape[0]
        noise = self.noise.to(self.device, self._dtype).expand(b, -1, -1).contiguous()
        return self.model.sample_actions(**batch, noise=noise, num_steps=self.num_steps)

    def predict(self, obs: Observation) -> PredictedChunk:
        t0 = time.perf_counter()
        with self._lock:
            batch = self.model_inputs([obs])
            t1 = time.perf_counter()
            out = self.sample_model_actions(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
        actions = self.processor.actions_from_model(out)[0]
        if not np.isfinite(actions).all():
            raise FloatingPointError(f"policy {self.model_id} produced non-finite actions")
        t3 = time.perf_counter()
        return PredictedChunk(
            actions=actions,
            step_period=self.step_period,
            stamp=obs.stamp,
            latency=t3 - t0,
            model_id=self.model_id,
            timing={"preprocess": t1 - t0, "model": t2 - t1, "postprocess": t3 - t2},
        )

    def warmup(self, instruction: str = "warm up") -> float:
        """One prediction on a blank observation so that the first real one is not slowed by lazy init."""
        c = self.processor.config
        blank = Observation(
            images={name: np.zeros((c.image_size, c.image_size, 3), np.uint8) for name in c.camera_names},
            state=np.asarray(c.state_norm.mean, dtype=np.float64),
            instruction=instruction,
        )
        return self.predict(blank).latency

    # ---------------------------------------------------------------- status
    def quantization_status(self) -> dict:
        """Fields of qvla_msgs/QuantizationStatus for the running policy."""
        if self._quantization is not None:
            return dict(self._quantization)
        n_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "artifact_id": "fp",
            "average_bits": float(8 * next(self.model.parameters()).element_size()),
            "roles": [],
            "role_average_bits": [],
            "pruned_fraction": 0.0,
            "weight_bytes": int(n_bytes),
            "fp_weight_bytes": int(n_bytes),
            "plan_hash": "",
        }


def _load_quantized(path: Path, device: str):
    """A qvla_quant artifact: the packed π0 plus the status fields for QuantizationStatus."""
    adapter = qvla_quant.load(path, device=device)
    model = adapter.model
    summary = artifact_summary(path)  # the manifest's summary, version-checked (older formats filled in)
    by_role = summary.get("average_bits_by_role", {})
    roles = sorted(by_role)
    status = {
        "artifact_id": str(path),
        "average_bits": float(summary.get("average_bits", float("nan"))),
        "roles": roles,
        "role_average_bits": [float(by_role[r]) for r in roles],
        "pruned_fraction": float(summary.get("pruned_fraction", 0.0)),
        # all parameters as stored vs the float source: what the robot's memory actually holds
        "weight_bytes": int(summary.get("parameter_bytes_after", 0)),
        "fp_weight_bytes": int(summary.get("parameter_bytes_before", 0)),
        "plan_hash": str(summary.get("plan_hash", "")),
    }
    return model.eval(), status
