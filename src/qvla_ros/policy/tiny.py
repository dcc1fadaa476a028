"""A small random-weight π0 policy directory, for tests and for trying the graph without a trained checkpoint.

Its actions are meaningless (random weights); its shapes, files and code paths are those of a real policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qvla_ros.policy.model import SmallPi0Spec, save_policy, small_pi0_config
from qvla_ros.policy.processor import Normalizer, Pi0Processor, ProcessorConfig, build_instruction_tokenizer

BIMANUAL_JOINTS = [
    f"{arm}_{j}"
    for arm in ("left", "right")
    for j in ("joint1", "joint2", "joint3", "joint4", "joint5", "joint6", "gripper")
]
CAMERAS = ["top", "left_wrist", "right_wrist"]
TINY_SPEC = SmallPi0Spec(
    width=64,
    layers=2,
    heads=2,
    vision_width=64,
    vision_layers=2,
    image_size=32,
    patch_size=16,
    chunk_size=30,
    num_inference_steps=4,
)


def make_processor(
    spec: SmallPi0Spec,
    instructions: list[str],
    joint_names: list[str],
    camera_names: list[str],
    state_norm: Normalizer,
    action_norm: Normalizer,
    control_hz: float = 30.0,
    max_text_tokens: int = 16,
) -> Pi0Processor:
    tokenizer = build_instruction_tokenizer(instructions)
    config = ProcessorConfig(
        camera_names=list(camera_names),
        joint_names=list(joint_names),
        image_size=spec.image_size,
        tokens_per_image=spec.tokens_per_image,
        image_token_id=tokenizer.token_to_id("<image>"),
        max_text_tokens=max_text_tokens,
        max_state_dim=spec.state_dim,
        max_action_dim=spec.action_dim,
        chunk_size=spec.chunk_size,
        control_hz=control_hz,
        state_norm=state_norm,
        action_norm=action_norm,
        bos_token_id=tokenizer.token_to_id("<bos>"),
        pad_token_id=tokenizer.token_to_id("<pad>"),
    )
    return Pi0Processor(config, tokenizer)


def make_tiny_policy(
    path: str | Path,
    seed: int = 0,
    spec: SmallPi0Spec = TINY_SPEC,
    instructions: tuple[str, ...] = ("transfer the cube",),
) -> Path:
    """Write a random-weight π0 policy for the 14-joint bimanual rig to `path` and return the path."""
    from transformers import PI0ForConditionalGeneration

    n = len(BIMANUAL_JOINTS)
    # plausible statistics (rad / normalized gripper) so that outputs land near a real arm pose
    norm = Normalizer(mean=[0.0, -0.9, 1.1, 0.0, -0.3, 0.0, 0.5] * 2, std=[0.3] * n)
    processor = make_processor(spec, list(instructions), BIMANUAL_JOINTS, CAMERAS, norm, norm)
    torch.manual_seed(seed)
    np.random.seed(seed)
    config = small_pi0_config(spec, processor.tokenizer.get_vocab_size(), processor.config.image_token_id)
    model = PI0ForConditionalGeneration(config).eval()
    return save_policy(path, model, processor, {"kind": "tiny-random", "seed": seed, "spec": spec.to_dict()})
