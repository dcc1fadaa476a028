"""π0-architecture policies in transformers' format: building small configs, saving and loading policy directories.

A policy directory holds:
    config.json, model.safetensors   transformers' `PI0ForConditionalGeneration` (save_pretrained format; a real
                                     π0 checkpoint converted to transformers has the same two files)
    processor.json, tokenizer.json   qvla_ros.policy.processor (cameras, joints, normalization, prompt)
    train_config.json                (ours only) how it was trained: data seed, steps, losses

The small configs here keep π0's structure (SigLIP vision tower -> linear projector -> Gemma language model whose
per-layer KV cache the Gemma action expert reads, flow matching over an action chunk) at a size that trains on a
2-core CPU in hours and fits a 25 MB checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qvla_ros.policy.processor import Pi0Processor, PolicyFormatError

MODEL_FILES = ("config.json", "model.safetensors")


def _quiet_transformers() -> None:
    """transformers draws a progress bar per load/save: noise in node logs and test output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass
class SmallPi0Spec:
    """Sizes of a small π0. The action expert must have as many layers as the language model (it attends to
    the language model's KV cache layer by layer) and the same KV head layout."""

    width: int = 128  # language model and action expert hidden size
    layers: int = 4
    heads: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    image_size: int = 96
    patch_size: int = 16
    chunk_size: int = 30
    state_dim: int = 14
    action_dim: int = 14
    num_inference_steps: int = 10

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads or self.vision_width % self.heads:
            raise ValueError("width and vision_width must be multiples of heads")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def small_pi0_config(spec: SmallPi0Spec, vocab_size: int, image_token_id: int):
    from transformers import PI0Config

    w, vw = spec.width, spec.vision_width
    return PI0Config(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(
                model_type="gemma",
                hidden_size=w,
                num_hidden_layers=spec.layers,
                intermediate_size=4 * w,
                num_attention_heads=spec.heads,
                num_key_value_heads=1,
                head_dim=w // spec.heads,
                vocab_size=vocab_size,
            ),
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=vw,
                intermediate_size=4 * vw,
                num_hidden_layers=spec.vision_layers,
                num_attention_heads=spec.heads,
                patch_size=spec.patch_size,
                image_size=spec.image_size,
                vision_use_head=False,
                projection_dim=w,
            ),
            projection_dim=w,
            image_token_id=image_token_id,
        ),
        dit_config=dict(
            model_type="gemma",
            hidden_size=w,
            num_hidden_layers=spec.layers,
            intermediate_size=4 * w,
            num_attention_heads=spec.heads,
            num_key_value_heads=1,
            head_dim=w // spec.heads,
        ),
        chunk_size=spec.chunk_size,
        max_state_dim=spec.state_dim,
        max_action_dim=spec.action_dim,
        num_inference_steps=spec.num_inference_steps,
    )


def check_policy_dir(path: str | Path) -> Path:
    """Refuse, before anything is loaded, a directory that is not a complete float π0 policy: missing files,
    pickle-based weights (never unpickled), a qvla_quant artifact without its artifact.json, or a
    model.safetensors that is truncated, corrupt or a pickle under that name."""
    from qvla_quant.checkpoint import CheckpointError, check_checkpoint_dir

    path = Path(path)
    if not path.is_dir():
        raise PolicyFormatError(
            f"policy directory {path} does not exist (train one with `qvla-train`, or pass the "
            "directory of a π0 checkpoint in transformers' format)"
        )
    try:
        if (path / "model.safetensors").is_file():
            check_checkpoint_dir(path)
        else:
            _check_without_weights(path)
    except CheckpointError as exc:
        raise PolicyFormatError(str(exc)) from None
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise PolicyFormatError(
            f"{path} is not a π0 policy directory: missing {', '.join(missing)} "
            "(expected transformers' save_pretrained output + processor.json + tokenizer.json)"
        )
    return path


def _check_without_weights(path: Path) -> None:
    """No model.safetensors: say why when the directory holds pickle weights or is an incomplete artifact."""
    from qvla_quant.checkpoint import check_checkpoint_dir, looks_like_artifact, pickle_files

    if pickle_files(path) or looks_like_artifact(path):
        check_checkpoint_dir(path)  # raises with the specific reason


def load_pi0_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load `PI0ForConditionalGeneration` from a local directory only (never the hub), from safetensors only
    (never pickle), refusing any missing, unexpected or mismatched tensor (see qvla_quant.checkpoint)."""
    from transformers import PI0Config, PI0ForConditionalGeneration

    from qvla_quant.checkpoint import CheckpointError, load_pretrained_strict

    _quiet_transformers()
    path = check_policy_dir(path)
    try:
        config = PI0Config.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise PolicyFormatError(
            f"{path / 'config.json'} is not a π0 config ({' '.join(str(exc).split())}): "
            "copy the policy again or re-save it"
        ) from None
    try:
        model = load_pretrained_strict(PI0ForConditionalGeneration, path, config=config, dtype=dtype)
    except CheckpointError as exc:
        raise PolicyFormatError(str(exc)) from None
    return model.to(device).eval()


def check_model_matches_processor(model, processor: Pi0Processor, where: str | Path) -> None:
    """Refuse a processor that would feed the model wrong shapes (mixing files from two checkpoints)."""
    c, mc = processor.config, model.config
    vision = mc.vlm_config.vision_config
    problems = []
    if vision.image_size != c.image_size:
        problems.append(f"image size {c.image_size} vs the vision tower's {vision.image_size}")
    if (vision.image_size // vision.patch_size) ** 2 != c.tokens_per_image:
        problems.append(
            f"{c.tokens_per_image} tokens per image vs the vision tower's "
            f"{(vision.image_size // vision.patch_size) ** 2}"
        )
    if mc.max_state_dim != c.max_state_dim or mc.max_action_dim != c.max_action_dim:
        problems.append("state/action dims differ")
    if mc.chunk_size != c.chunk_size:
        problems.append(f"chunk size {c.chunk_size} vs the model's {mc.chunk_size}")
    if mc.vlm_config.image_token_id != c.image_token_id:
        problems.append(f"image token id {c.image_token_id} vs the model's {mc.vlm_config.image_token_id}")
    if problems:
        raise PolicyFormatError(f"{where}: processor.json does not match the model: {'; '.join(problems)}")


def save_policy(path: str | Path, model, processor: Pi0Processor, train_config: dict | None = None) -> Path:
    _quiet_transformers()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save(path)
    if train_config is not None:
        (path / "train_config.json").write_text(json.dumps(train_config, indent=1))
    return path
