"""Robot observations <-> π0 model tensors, with no torchvision and no hub access.

transformers' PI0Processor needs torchvision and a PaliGemma tokenizer from the hub; neither is available to a
robot computer that is offline (and torchvision does not import beside our pinned torch). This processor does the
same job with torch and `tokenizers` alone, and its state lives in the policy directory:

    processor.json   camera names, joint names, image size, prompt length, normalization statistics
    tokenizer.json   a `tokenizers` tokenizer (ours is word-level, built from the task instructions; a real π0
                     checkpoint's PaliGemma tokenizer.json works the same way)

The batch it produces is exactly what `PI0ForConditionalGeneration` takes (the format qvla_quant's π0 adapter
documents): `pixel_values` [B, n_cameras, 3, S, S] in [-1, 1] (SigLIP normalization), `pixel_attention_mask`
[B, n_cameras] bool, `input_ids` / `attention_mask` [B, L] (image placeholder tokens, BOS, instruction, "\\n",
right padding), `state` [B, max_state_dim] normalized and zero-padded. Actions are normalized per joint with the
dataset mean/std and zero-padded to max_action_dim.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PROCESSOR_FILE = "processor.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")


class PolicyFormatError(ValueError):
    """A policy directory or an observation does not match what the policy expects."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the CLIs print `<prog>: error: <one line>`)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class Normalizer:
    """Per-dimension affine normalization x_n = (x - mean) / std, with a floor on std so that joints that never
    moved in the demonstrations (std ~ 0) do not blow up."""

    mean: list[float]
    std: list[float]

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise PolicyFormatError(f"normalizer mean has {len(self.mean)} entries but std has {len(self.std)}")

    @classmethod
    def fit(cls, data: np.ndarray, std_floor: float = 1e-2) -> Normalizer:
        data = np.asarray(data, dtype=np.float64).reshape(-1, data.shape[-1])
        return cls(data.mean(0).tolist(), np.maximum(data.std(0), std_floor).tolist())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return (x - mean) / std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return x * std + mean


@dataclass
class ProcessorConfig:
    camera_names: list[str]
    joint_names: list[str]
    image_size: int  # square side the cameras are resized to (the vision tower's image_size)
    tokens_per_image: int  # (image_size / patch_size)^2
    image_token_id: int
    max_text_tokens: int  # instruction tokens incl. BOS and "\n"; longer instructions are cut, with a warning
    max_state_dim: int
    max_action_dim: int
    chunk_size: int
    control_hz: float
    state_norm: Normalizer
    action_norm: Normalizer
    bos_token_id: int = 2
    pad_token_id: int = 0
    newline_token: str = "\n"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.state_norm, dict):
            self.state_norm = Normalizer(**self.state_norm)
        if isinstance(self.action_norm, dict):
            self.action_norm = Normalizer(**self.action_norm)
        n = len(self.joint_names)
        if len(self.state_norm.mean) != n or len(self.action_norm.mean) != n:
            raise PolicyFormatError(
                f"processor has {n} joints but normalization statistics for {len(self.state_norm.mean)} (state) / "
                f"{len(self.action_norm.mean)} (action) dims"
            )
        if n > self.max_state_dim or n > self.max_action_dim:
            raise PolicyFormatError(f"{n} joints do not fit the model's max_state_dim/max_action_dim")

    @property
    def step_period(self) -> float:
        return 1.0 / self.control_hz

    def to_dict(self) -> dict:
        return asdict(self)


class Pi0Processor:
    """Turns `Observation`s into π0 batches and model outputs into joint-space action chunks."""

    def __init__(self, config: ProcessorConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self._prompt_cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROCESSOR_FILE).write_text(json.dumps(self.config.to_dict(), indent=1))
        self.tokenizer.save(str(directory / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> Pi0Processor:
        from tokenizers import Tokenizer

        directory = Path(directory)
        for name in (PROCESSOR_FILE, TOKENIZER_FILE):
            if not (directory / name).is_file():
                raise PolicyFormatError(
                    f"{directory / name} is missing: a qvla policy directory holds config.json, model.safetensors, "
                    f"{PROCESSOR_FILE} and {TOKENIZER_FILE} (see `qvla-train` or qvla_ros.policy.tiny)"
                )
        path = directory / PROCESSOR_FILE
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            config = ProcessorConfig(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # JSONDecodeError/UnicodeDecodeError too
            raise PolicyFormatError(
                f"{path} is not a valid processor config ({' '.join(str(exc).split())}): copy the policy directory "
                "again or re-save it"
            ) from None
        path = directory / TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
            raise PolicyFormatError(
                f"{path} is not a valid `tokenizers` tokenizer ({' '.join(str(exc).split())}): the file is corrupt "
                "or of another format; copy it again from the policy's source"
            ) from None
        return cls(config, tokenizer)

    # ---------------------------------------------------------------- inputs
    def _newline_id(self) -> int:
        """π0 ends the prompt with "\n"; word-level tokenizers drop whitespace, so it is a vocabulary entry."""
        nl = self.config.newline_token
        ids = self.tokenizer.encode(nl, add_special_tokens=False).ids
        tid = ids[0] if ids else self.tokenizer.token_to_id(nl)
        if tid is None:
            raise PolicyFormatError(f"the tokenizer has no token for the prompt terminator {nl!r}")
        return tid

    def prompt_ids(self, instruction: str) -> list[int]:
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            c = self.config
            text = self.tokenizer.encode(instruction.strip(), add_special_tokens=False).ids
            ids = [c.bos_token_id, *text][: c.max_text_tokens - 1] + [self._newline_id()]
            self._prompt_cache[instruction] = ids
        return ids

    def images_tensor(self, images: list[dict[str, np.ndarray]]) -> torch.Tensor:
        """[B, n_cameras, 3, S, S] float in [-1, 1] from uint8 HxWx3 RGB images of any size.

        Each camera is resized to the model's S x S on its own, so cameras of different resolutions (a 720x1280
        top camera beside 480x640 wrist cameras) can be mixed, and so can frames of different sizes in a batch.
        """
        c = self.config
        per_camera = []
        for name in c.camera_names:
            frames = [self._camera_frame(sample, name) for sample in images]
            if len({f.shape for f in frames}) == 1:
                resized = self._resize(torch.stack(frames))  # one call for the batch: [B, 3, S, S]
            else:
                resized = torch.cat([self._resize(f[None]) for f in frames])
            per_camera.append(resized)
        x = torch.stack(per_camera, dim=1)  # [B, n, 3, S, S]
        return x / 127.5 - 1.0

    def _camera_frame(self, sample: dict[str, np.ndarray], name: str) -> torch.Tensor:
        """One camera's image of one observation as float [3, H, W] (0..255), validated."""
        c = self.config
        if name not in sample:
            raise PolicyFormatError(
                f"observation has no image from camera {name!r} (has {sorted(sample)}); the policy was "
                f"trained with cameras {c.camera_names}"
            )
        img = np.asarray(sample[name])
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise PolicyFormatError(
                f"camera {name!r}: expected an HxWx3 uint8 RGB image, got shape {img.shape} {img.dtype}"
            )
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise PolicyFormatError(f"camera {name!r}: empty image (shape {img.shape}); expected HxWx3 with H, W > 0")
        # one conversion to a new float array, which torch can own (a read-only recording buffer is never shared)
        return torch.from_numpy(img.astype(np.float32, order="C")).permute(2, 0, 1)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 3, S, S] (unchanged when already S x S)."""
        size = self.config.image_size
        if x.shape[-2:] == (size, size):
            return x
        # antialias: a 240x320 camera image shrunk to ~96 px would alias badly with plain bilinear
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def text_tensors(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        n_img = c.tokens_per_image * len(c.camera_names)
        length = n_img + c.max_text_tokens
        ids = torch.full((len(instructions), length), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(instructions), length), dtype=torch.long)
        for i, text in enumerate(instructions):
            prompt = self.prompt_ids(text)
            ids[i, :n_img] = c.image_token_id
            ids[i, n_img : n_img + len(prompt)] = torch.tensor(prompt)
            mask[i, : n_img + len(prompt)] = 1
        return ids, mask

    def state_tensor(self, states: list[np.ndarray]) -> torch.Tensor:
        c = self.config
        s = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float32) for x in states]))
        if s.shape[-1] != len(c.joint_names):
            raise PolicyFormatError(
                f"state has {s.shape[-1]} values but the policy expects {len(c.joint_names)} ({c.joint_names})"
            )
        if not torch.isfinite(s).all():
            raise PolicyFormatError("state contains non-finite values")
        return F.pad(c.state_norm.normalize(s), (0, c.max_state_dim - s.shape[-1]))

    def batch(self, observations) -> dict[str, torch.Tensor]:
        """Model inputs for a list of `Observation`s (no actions)."""
        ids, mask = self.text_tensors([o.instruction for o in observations])
        pixels = self.images_tensor([o.images for o in observations])
        return {
            "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(pixels.shape[:2], dtype=torch.bool),
            "input_ids": ids,
            "attention_mask": mask,
            "state": self.state_tensor([o.state for o in observations]),
        }

    # ---------------------------------------------------------------- actions
    def actions_to_model(self, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, H, n_joints] absolute targets -> normalized, padded [B, H, max_action_dim]."""
        c = self.config
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32))
        return F.pad(c.action_norm.normalize(a), (0, c.max_action_dim - a.shape[-1]))

    def actions_from_model(self, model_actions: torch.Tensor) -> np.ndarray:
        """[B, H, max_action_dim] model output -> [B, H, n_joints] absolute joint targets (float64)."""
        n = len(self.config.joint_names)
        a = self.config.action_norm.unnormalize(model_actions[..., :n].float())
        return a.detach().cpu().numpy().astype(np.float64)


def build_instruction_tokenizer(instructions: list[str]):
    """A word-level tokenizer over the words of the task instructions (lower-cased), with the special tokens
    π0's prompt needs. Small and exact: every instruction the rig uses tokenizes without <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = sorted({w for text in instructions for w in _split_words(text)} | {"\n"})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # words and punctuation are tokens; "\n" (π0's prompt terminator) is in the vocabulary but is appended by the
    # processor, since whitespace splitting drops it
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _split_words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())
