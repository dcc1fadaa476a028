"""The trained policy committed under models/ (what `make demo` runs) loads and predicts, float and quantized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qvla_ros.policy.runtime import PolicyRuntime
from qvla_ros.policy.types import Observation

MODELS = Path(__file__).resolve().parents[2] / "models"
FP = MODELS / "sim_transfer_cube_fp"
W4 = MODELS / "sim_transfer_cube_w4"


def sim_observation(seed: int = 1000) -> Observation:
    from qvla_ros.sim.rig import SimRig

    with SimRig() as rig:
        o = rig.reset(seed=seed)
        return Observation(images=o.images, state=o.qpos, instruction=rig.instruction, stamp=0.0)


@pytest.mark.sim
def test_committed_policies_load_and_predict_finite_chunks():
    obs = sim_observation()
    fp = PolicyRuntime.load(FP)
    q = PolicyRuntime.load(W4)
    a, b = fp.predict(obs), q.predict(obs)
    for chunk in (a, b):
        assert chunk.actions.shape == (30, 14) and np.isfinite(chunk.actions).all()
    assert np.array_equal(a.actions, fp.predict(obs).actions)  # fixed noise: deterministic
    # The quantized policy acts like the float one on a real scene. The bar is set by what it must be told apart
    # from: on this scene (seed 1000) the 4-bit artifact's largest deviation from FP is 1.35% of the largest
    # action, while the FP policy itself started from other flow-matching noise (noise_seed 1..8) deviates
    # 7.4% to 13% (7.44% for seed 1, the closest). 3% lies between them with a margin of about 2.2x on the
    # artifact's side and 2.5x on the other: an artifact that acted no more like FP than a re-drawn noise does
    # fails, ordinary float differences across CPUs and torch builds do not. (Other scenes: 2.0% at 1001, 3.3% at
    # 1002; the bar holds for this scene only.)
    tolerance = 0.03
    scale = np.abs(a.actions).max()
    assert np.abs(a.actions - b.actions).max() < tolerance * scale
    assert not np.array_equal(a.actions, b.actions)  # and it is really the quantized model that ran
    other_noise = PolicyRuntime.load(FP, noise_seed=1).predict(obs)  # the bar separates the two
    assert np.abs(a.actions - other_noise.actions).max() > tolerance * scale


def test_committed_artifact_is_a_real_packed_model():
    status = PolicyRuntime.load(W4, warmup=False).quantization_status()
    assert status["average_bits"] <= 4.0 + 1e-9 and status["plan_hash"]
    # packed: all weights as stored are a fraction of the float checkpoint's
    assert status["weight_bytes"] < 0.5 * status["fp_weight_bytes"]
    files = {p.name: p.stat().st_size for p in W4.iterdir() if p.is_file()}
    assert files["model.safetensors"] < 0.5 * (FP / "model.safetensors").stat().st_size
    info = json.loads((FP / "train_config.json").read_text())
    assert "data_seed" in info["train_config"] and info["step"] == info["train_config"]["steps"]
    for d in (FP, W4):  # everything the robot needs is in the directory, and small enough for git
        assert {"processor.json", "tokenizer.json", "config.json", "model.safetensors"} <= set(
            p.name for p in d.iterdir()
        )
        assert sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) < 25 * 2**20


@pytest.mark.sim
def test_committed_artifact_through_the_default_kernels_acts_like_the_reference_path():
    """What a robot runs by default (`QVLA_KERNELS` unset: the CPU fast path where the CPU has fast bf16, the
    Triton kernels on CUDA) against the exact reference path, on a real scene. Each layer's fast path is within
    ~5e-3 of its output's largest magnitude (tests/qvla_quant/test_kernels_cpu.py); through 10 denoising steps and
    ~80 layers the chunk must stay well inside the 3% bar above that separates the artifact from a re-drawn noise:
    1% of the largest action."""
    from qvla_quant.transforms import set_kernels

    obs = sim_observation()
    q = PolicyRuntime.load(W4, warmup=False)
    set_kernels(q.model, "reference")
    ref = q.predict(obs).actions
    set_kernels(q.model, "auto")
    fast = q.predict(obs).actions
    assert np.isfinite(fast).all()
    assert np.abs(fast - ref).max() < 0.01 * np.abs(ref).max()
