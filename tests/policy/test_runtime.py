"""PolicyRuntime on a small random-weight π0 saved in transformers' format (the real-checkpoint path)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qvla_ros.policy.processor import Pi0Processor, PolicyFormatError
from qvla_ros.policy.runtime import PolicyRuntime
from qvla_ros.policy.tiny import BIMANUAL_JOINTS, CAMERAS, make_tiny_policy
from qvla_ros.policy.types import Observation


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", seed=3)


def observation(seed: int, size=(240, 320)) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        images={c: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in CAMERAS},
        state=rng.normal(0, 0.3, 14),
        instruction="transfer the cube",
        stamp=1.5,
    )


def test_loads_and_predicts_finite_chunks_of_the_right_shape(tiny_dir):
    rt = PolicyRuntime.load(tiny_dir)
    assert rt.camera_names == CAMERAS and rt.joint_names == BIMANUAL_JOINTS
    chunk = rt.predict(observation(0))
    assert chunk.actions.shape == (rt.horizon, 14) == (30, 14)
    assert np.isfinite(chunk.actions).all()
    assert chunk.step_period == pytest.approx(1 / 30)
    assert chunk.stamp == 1.5 and chunk.latency > 0 and set(chunk.timing) == {"preprocess", "model", "postprocess"}
    status = rt.quantization_status()
    assert status["artifact_id"] == "fp" and status["weight_bytes"] == status["fp_weight_bytes"] > 0


def test_predict_is_deterministic_for_fixed_noise(tiny_dir):
    a = PolicyRuntime.load(tiny_dir, warmup=False)
    b = PolicyRuntime.load(tiny_dir, warmup=False)
    obs = observation(1)
    first = a.predict(obs).actions
    assert np.array_equal(first, a.predict(obs).actions)
    assert np.array_equal(first, b.predict(obs).actions)
    # another noise seed is another sample of the flow: different actions (random weights still depend on it)
    c = PolicyRuntime.load(tiny_dir, warmup=False, noise_seed=1)
    assert not np.allclose(first, c.predict(obs).actions)
    # the observation matters
    assert not np.allclose(first, a.predict(observation(2)).actions)


def test_images_of_any_size_are_resized(tiny_dir):
    rt = PolicyRuntime.load(tiny_dir, warmup=False)
    assert rt.predict(observation(0, size=(48, 64))).actions.shape == (30, 14)


def test_processor_round_trips_actions(tiny_dir):
    proc = Pi0Processor.load(tiny_dir)
    a = np.random.default_rng(0).normal(size=(2, 30, 14))
    back = proc.actions_from_model(proc.actions_to_model(a))
    np.testing.assert_allclose(back, a, atol=1e-5)


def test_bad_inputs_give_clear_errors(tiny_dir, tmp_path):
    rt = PolicyRuntime.load(tiny_dir, warmup=False)
    obs = observation(0)
    del obs.images["left_wrist"]
    with pytest.raises(PolicyFormatError, match="left_wrist"):
        rt.predict(obs)
    obs = observation(0)
    obs.images["top"] = obs.images["top"][..., 0]  # mono image where RGB is expected
    with pytest.raises(PolicyFormatError, match="HxWx3 uint8"):
        rt.predict(obs)
    obs = observation(0)
    obs.state = obs.state[:7]
    with pytest.raises(PolicyFormatError, match="7 values"):
        rt.predict(obs)

    with pytest.raises(PolicyFormatError, match="does not exist"):
        PolicyRuntime.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "processor.json").unlink()
    with pytest.raises(PolicyFormatError, match="processor.json is missing"):
        PolicyRuntime.load(broken)

    # files from two different checkpoints: a processor for another image size
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_dir, mixed)
    cfg = json.loads((mixed / "processor.json").read_text())
    cfg["image_size"] = 64
    cfg["tokens_per_image"] = 16
    (mixed / "processor.json").write_text(json.dumps(cfg))
    with pytest.raises(PolicyFormatError, match="does not match the model"):
        PolicyRuntime.load(mixed)

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyFormatError, match="model.safetensors"):
        PolicyRuntime.load(truncated)


# ---------------------------------------------------------------- cameras of different resolutions
def previous_images_tensor(proc: Pi0Processor, images: list[dict[str, np.ndarray]]):
    """The processor's former implementation (stack all cameras, then resize once): equal-size cameras only."""
    import torch
    import torch.nn.functional as F

    c = proc.config
    per_camera = [torch.stack([torch.from_numpy(np.ascontiguousarray(s[n])) for s in images]) for n in c.camera_names]
    x = torch.stack(per_camera, dim=1).permute(0, 1, 4, 2, 3).float()
    b, n = x.shape[:2]
    x = x.reshape(b * n, *x.shape[2:])
    if x.shape[-2:] != (c.image_size, c.image_size):
        x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).reshape(b, n, 3, c.image_size, c.image_size)


def camera_images(seed: int, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 256, (*sizes[c], 3), dtype=np.uint8) for c in CAMERAS}


MIXED = {"top": (720, 1280), "left_wrist": (480, 640), "right_wrist": (480, 640)}


def test_cameras_of_different_resolutions_are_resized_each(tiny_dir):
    import torch

    rt = PolicyRuntime.load(tiny_dir, warmup=False)
    proc, s = rt.processor, rt.processor.config.image_size
    obs = observation(0)
    obs.images = camera_images(0, MIXED)
    chunk = rt.predict(obs)
    assert chunk.actions.shape == (30, 14) and np.isfinite(chunk.actions).all()
    # each camera's slot is that camera resized alone, whatever the other cameras' sizes
    mixed = proc.images_tensor([obs.images, camera_images(1, {**MIXED, "left_wrist": (240, 320)})])
    assert mixed.shape == (2, 3, 3, s, s)
    for i, name in enumerate(CAMERAS):
        alone = previous_images_tensor(proc, [{c: obs.images[name] for c in CAMERAS}])[0, 0]
        torch.testing.assert_close(mixed[0, i], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(240, 320), (32, 32), (48, 64)])
def test_equal_size_cameras_give_the_previous_result(tiny_dir, size):
    import torch

    proc = Pi0Processor.load(tiny_dir)
    images = [camera_images(seed, dict.fromkeys(CAMERAS, size)) for seed in (0, 1, 2)]
    # pixel values in [-1, 1]; only the summation order of the resize may differ
    torch.testing.assert_close(proc.images_tensor(images), previous_images_tensor(proc, images), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "image, fragment",
    [
        (np.zeros((0, 640, 3), np.uint8), "empty image"),
        (np.zeros((480, 0, 3), np.uint8), "empty image"),
        (np.zeros((480, 640, 3), np.float32), "HxWx3 uint8"),
        (np.zeros((480, 640, 4), np.uint8), "HxWx3 uint8"),
        (np.zeros((480, 640), np.uint8), "HxWx3 uint8"),
    ],
    ids=["zero-height", "zero-width", "float", "rgba", "mono"],
)
def test_wrong_camera_images_name_the_camera(tiny_dir, image, fragment):
    proc = Pi0Processor.load(tiny_dir)
    images = camera_images(0, MIXED)
    images["right_wrist"] = image
    with pytest.raises(PolicyFormatError, match=f"camera 'right_wrist'.*{fragment}"):
        proc.images_tensor([images])
