"""Policy training on real (scripted-expert) episodes: the loss falls, resume and fine-tuning continue, the
auxiliary localization loss learns, wrist-camera and state dropout blank what they should."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qvla_ros.policy.model import SmallPi0Spec
from qvla_ros.policy.runtime import PolicyRuntime
from qvla_ros.policy.train import TrainConfig, load_samples, train

pytestmark = [pytest.mark.sim, pytest.mark.slow]

SPEC = SmallPi0Spec(
    width=64,
    layers=2,
    heads=2,
    vision_width=64,
    vision_layers=2,
    image_size=32,
    patch_size=16,
    chunk_size=10,
    num_inference_steps=3,
)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from qvla_ros.sim.record import record_episode
    from qvla_ros.sim.rig import SimRig

    out = tmp_path_factory.mktemp("demos")
    # large enough for the cube to cover a few pixels of the top camera (the localization test needs to see it)
    with SimRig(image_size=(96, 128)) as rig:
        for seed in (0, 1):
            res = record_episode(out / f"episode_{seed:06d}", seed, rig)
            assert res.success
    return out


def test_short_training_reduces_loss_and_resumes(demos, tmp_path):
    cfg = TrainConfig(
        episodes=str(demos),
        out=str(tmp_path / "run"),
        spec=SPEC,
        steps=160,
        batch_size=16,
        lr=2e-3,
        warmup_steps=10,
        val_episodes=1,
        checkpoint_every=80,
        shift_augment=1,
        threads=1,
    )
    final = train(cfg, progress=False)
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    hist = state["history"]
    assert [h["step"] for h in hist] == [80, 160]

    # the loss on the training data, with fixed noise and times, before vs after training
    from transformers import PI0ForConditionalGeneration

    from qvla_ros.policy.model import load_pi0_model, small_pi0_config
    from qvla_ros.policy.processor import Pi0Processor
    from qvla_ros.policy.train import validation_loss

    proc = Pi0Processor.load(final)
    samples = load_samples(
        sorted(demos.iterdir()), proc.config.camera_names, SPEC.image_size, SPEC.chunk_size, progress=False
    )
    val_name = json.loads((final / "train_config.json").read_text())["val_episodes"][0]
    train_ep = [i for i, p in enumerate(sorted(demos.iterdir())) if p.name != val_name]
    idx = np.nonzero(np.isin(samples.episode_idx, train_ep))[0][::3]
    torch.manual_seed(cfg.seed)
    untrained = PI0ForConditionalGeneration(
        small_pi0_config(SPEC, proc.tokenizer.get_vocab_size(), proc.config.image_token_id)
    )
    before = validation_loss(untrained, samples, idx, proc, 32)
    after = validation_loss(load_pi0_model(final), samples, idx, proc, 32)
    # flow-matching loss of a zero-velocity guess is ~1 + Var(a) ~ 2 here; the fit must clearly beat the init
    assert after < 0.7 * before, (before, after)

    # the final directory is a complete policy
    chunk = PolicyRuntime.load(final, warmup=False)
    assert chunk.horizon == SPEC.chunk_size

    # resume: continues from step 160 to 180 without re-initializing
    cfg.steps = 180
    train(cfg, resume=True, progress=False)
    hist = json.loads((tmp_path / "run" / "train_state.json").read_text())["history"]
    assert [h["step"] for h in hist] == [80, 160, 180]


def test_fine_tuning_starts_from_the_source_policy(demos, tmp_path):
    base = TrainConfig(
        episodes=str(demos),
        out=str(tmp_path / "base"),
        spec=SPEC,
        steps=40,
        batch_size=16,
        lr=2e-3,
        warmup_steps=5,
        val_episodes=1,
        checkpoint_every=40,
        threads=1,
    )
    source = train(base, progress=False)
    tuned_cfg = TrainConfig(
        episodes=str(demos),
        out=str(tmp_path / "tuned"),
        spec=SPEC,
        steps=1,
        batch_size=16,
        lr=1e-9,
        warmup_steps=1,
        val_episodes=1,
        checkpoint_every=1,
        threads=1,
        init_from=str(source),
    )
    tuned = train(tuned_cfg, progress=False)
    # one step at a negligible learning rate: the weights are the source's, and so is the processor
    from safetensors.torch import load_file

    a, b = load_file(str(source / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert (source / "processor.json").read_text() == (tuned / "processor.json").read_text()
    info = json.loads((tuned / "train_config.json").read_text())
    assert info["train_config"]["init_from"] == str(source)
    assert info["init_from_config"]["train_config"]["steps"] == 40  # the source's provenance travels along
    checkpoint = json.loads((tmp_path / "tuned" / "last" / "train_config.json").read_text())
    assert checkpoint["init_from_config"]["train_config"]["steps"] == 40  # and into every checkpoint


def test_object_localization_aux_loss_learns_and_stays_out_of_the_policy(demos, tmp_path):
    from safetensors.torch import load_file

    from qvla_ros.episodes.reader import read_episode
    from qvla_ros.policy.train import initial_object_xy
    from qvla_ros.sim.rig import sample_object_poses

    # the sim recorder writes each object's initial pose; older recordings fall back to the seed
    episode = read_episode(demos / "episode_000001", horizon=SPEC.chunk_size)
    expected = sample_object_poses("transfer_cube", 1)[:2]
    np.testing.assert_allclose(initial_object_xy(episode.metadata), expected, atol=1e-6)
    legacy = {k: v for k, v in episode.metadata.items() if k != "initial_object_poses"}
    np.testing.assert_allclose(initial_object_xy(legacy), expected, atol=1e-6)
    assert initial_object_xy({"source": "teleop"}) is None

    weight = 1.0
    # both episodes train (no validation split): the standardized targets are +-1 per axis, so the
    # zero-initialized head starts at loss `weight`; telling two cube positions apart from the image drives it down
    spec = SmallPi0Spec(**{**SPEC.to_dict(), "image_size": 64})
    cfg = TrainConfig(
        episodes=str(demos),
        out=str(tmp_path / "aux"),
        spec=spec,
        steps=200,
        batch_size=16,
        lr=2e-3,
        warmup_steps=10,
        val_episodes=0,
        checkpoint_every=200,
        threads=1,
        object_aux_weight=weight,
    )
    final = train(cfg, progress=False)
    hist = json.loads((tmp_path / "aux" / "train_state.json").read_text())["history"]
    assert hist[-1]["object_aux_loss_ema"] < 0.7 * weight, hist
    # the auxiliary head is training-only: the policy has exactly the π0 weights of a run without it
    plain = TrainConfig(
        episodes=str(demos),
        out=str(tmp_path / "plain"),
        spec=SPEC,
        steps=1,
        batch_size=4,
        warmup_steps=1,
        val_episodes=1,
        checkpoint_every=1,
        threads=1,
    )
    assert (
        load_file(str(final / "model.safetensors")).keys()
        == load_file(str(train(plain, progress=False) / "model.safetensors")).keys()
    )
    assert (tmp_path / "aux" / "aux_head.safetensors").is_file()


def test_wrist_and_state_dropout_blank_what_they_should(demos):
    from qvla_ros.policy.processor import Normalizer
    from qvla_ros.policy.tiny import BIMANUAL_JOINTS, CAMERAS, make_processor
    from qvla_ros.policy.train import make_batch

    samples = load_samples(sorted(demos.iterdir()), CAMERAS, SPEC.image_size, SPEC.chunk_size, progress=False)
    proc = make_processor(
        SPEC,
        samples.instructions,
        BIMANUAL_JOINTS,
        CAMERAS,
        Normalizer.fit(samples.state),
        Normalizer.fit(samples.actions),
    )
    idx = np.arange(0, len(samples), 7)
    kept = make_batch(samples, idx, proc, 0, np.random.default_rng(0))["pixel_values"]
    dropped = make_batch(samples, idx, proc, 0, np.random.default_rng(0), wrist_dropout=1.0)["pixel_values"]
    assert torch.equal(dropped[:, 0], kept[:, 0])  # the top camera is untouched
    assert float(dropped[:, 1:].abs().max()) == 0.0 and float(kept[:, 1:].abs().max()) > 0.5
    some = make_batch(samples, idx, proc, 0, np.random.default_rng(0), wrist_dropout=0.5)["pixel_values"]
    blank = (some[:, 1:].flatten(1).abs().amax(1) == 0).float().mean()
    assert 0.2 < float(blank) < 0.8

    # state dropout replaces the normalized state with 0 (the dataset mean) and leaves the images alone
    full = make_batch(samples, idx, proc, 0, np.random.default_rng(0))
    none = make_batch(samples, idx, proc, 0, np.random.default_rng(0), state_dropout=1.0)
    assert float(none["state"].abs().max()) == 0.0 and float(full["state"].abs().max()) > 0.1
    assert torch.equal(none["pixel_values"], full["pixel_values"]) and torch.equal(none["actions"], full["actions"])
