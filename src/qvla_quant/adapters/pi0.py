"""π0 through transformers' native `PI0ForConditionalGeneration` (PaliGemma VLM + Gemma action expert, flow matching).

Batch format (what `PI0ForConditionalGeneration.sample_actions` takes, and what `PI0Processor` returns):

    input_ids             long [B, L]       per sample: image_token_id repeated tokens_per_image * n_cameras times
                                            (camera order), then the tokenized instruction ("<bos>text\\n"), right-
                                            padded; tokens_per_image = (image_size / patch_size)^2
    attention_mask        long [B, L]       1 for real tokens, 0 for padding (optional; no padding when absent)
    pixel_values          float [B, C, 3, S, S]  C camera slots, SigLIP-normalized images of side S = image_size
    pixel_attention_mask  bool [B, C]       which camera slots are real (missing cameras are zero images, False)
    state                 float [B, max_state_dim]  normalized proprioception, zero-padded

The adapter knows nothing about robots: turning three camera frames, a 14-dim state and an instruction into this
batch is the processor's job. `actions` returns the first `action_dim` dims of the denoised chunk
[B, chunk_size, action_dim] (the rest of `max_action_dim` is padding the robot never reads); with `action_steps`
only the chunk's first steps [B, action_steps, action_dim]: the ones a robot that replans every `action_steps`
ticks executes, so that a sensitivity (Eq. 4) measured on it counts only errors that reach the arms.

Roles (module names checked against transformers 5.24):
    model.vlm.vision_tower.*           vision       (incl. the Conv2d patch embedding, quantized per output filter)
    model.vlm.multi_modal_projector.*  projector
    model.vlm.language_model.*         language
    model.dit.*                        action       (the action expert)
    embed_action_time.*, action_out_proj   action_head

Dead layers: the action expert reads the VLM only through its key/value cache, so in the last VLM layer the query,
output projection and MLP never influence the action (their outputs feed only the VLM's unused final hidden
state). They are reported by `known_dead_layers`, and gradient-based detection finds them too.

Token embeddings: the VLM's table (`model.vlm.language_model.embed_tokens`, vocab x 2048 at the published size) is
read by `embed_prefix` for the instruction tokens; the action expert's own table (`model.dit.embed_tokens`,
vocab x 1024) is never read, because `PI0Model.forward` always calls the expert with `inputs_embeds` (the
state / noise / time embedding) and never with token ids (transformers 5.24, modeling_pi0.py). `embedding_plans`
gives the first a bit-width and the second 0 bits (not stored: `qvla_quant.packed_embedding.DroppedEmbedding`).
Neither is tied to anything (no lm_head in π0), so both can be packed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qvla_quant.adapters.base import Batch, PolicyAdapter
from qvla_quant.checkpoint import load_pretrained_strict
from qvla_quant.packed_embedding import embedding_plans
from qvla_quant.plan import EmbeddingPlan

REQUIRED_KEYS = ("input_ids", "pixel_values", "pixel_attention_mask", "state")
OPTIONAL_KEYS = ("attention_mask",)
VLM_EMBEDDING = "model.vlm.language_model.embed_tokens"  # read by embed_prefix (the instruction's tokens)
EXPERT_EMBEDDING = "model.dit.embed_tokens"  # never read: the expert always gets inputs_embeds


def _transformers_pi0():
    try:
        from transformers import PI0Config, PI0ForConditionalGeneration
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError(
            "the π0 adapter needs transformers >= 5 with PI0ForConditionalGeneration "
            f"(pip install 'transformers>=5'): {e}"
        ) from None
    return PI0Config, PI0ForConditionalGeneration


@dataclass(frozen=True)
class _Pi0Prefix:
    """The VLM's KV cache of one batch: per VLM layer (key, value) [B, kv_heads, prefix_len, head_dim]."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)


class Pi0Adapter(PolicyAdapter):
    name = "pi0"
    role_rules = {
        r"re:model\.vlm\.vision_tower\..*": "vision",
        r"re:model\.vlm\.multi_modal_projector\..*": "projector",
        r"re:model\.vlm\.language_model\..*": "language",
        r"re:model\.dit\..*": "action",
        r"re:embed_action_time\..*": "action_head",
        "action_out_proj": "action_head",
    }

    def __init__(
        self,
        model,
        *,
        action_dim: int | None = None,
        num_steps: int | None = None,
        noise_seed: int = 0,
        action_steps: int | None = None,
    ):
        super().__init__(model, noise_seed=noise_seed)
        config = model.config
        self.action_dim = int(action_dim) if action_dim is not None else config.max_action_dim
        if not 1 <= self.action_dim <= config.max_action_dim:
            raise ValueError(f"action_dim must be in [1, {config.max_action_dim}] (max_action_dim), got {action_dim}")
        # None = the whole chunk; else the first action_steps steps (what is executed between two predictions)
        self.action_steps = int(action_steps) if action_steps is not None else None
        if self.action_steps is not None and not 1 <= self.action_steps <= config.chunk_size:
            raise ValueError(f"action_steps must be in [1, {config.chunk_size}] (chunk_size), got {action_steps}")
        # None = the checkpoint's own num_inference_steps (the real denoising loop)
        self.num_steps = int(num_steps) if num_steps is not None else None
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self._sample = getattr(type(model).sample_actions, "__wrapped__", None)
        if self._sample is None:  # pragma: no cover - guards against a transformers change
            raise TypeError("PI0ForConditionalGeneration.sample_actions is not a no_grad-wrapped function anymore")

    # ---- structure
    def known_dead_layers(self) -> list[str]:
        n = self.model.config.vlm_config.text_config.num_hidden_layers
        prefix = f"model.vlm.language_model.layers.{n - 1}"
        names = [f"{prefix}.self_attn.q_proj", f"{prefix}.self_attn.o_proj"]
        names += [f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        present = dict(self.model.named_modules())
        return [n for n in names if n in present]

    def unused_embeddings(self) -> list[str]:
        """Token-embedding tables that sampling never reads: the action expert's (see the module docstring)."""
        return [n for n in (EXPERT_EMBEDDING,) if n in dict(self.model.named_modules())]

    def embedding_plans(self, bits: int | None = 8) -> dict[str, EmbeddingPlan]:
        """`Plan.embeddings` entries for π0: the VLM's token table at `bits` (2, 3, 4, 6, 8 or 16; None: not in
        the plan, it stays float) and every unused table (`unused_embeddings`) at 0 bits (not stored)."""
        rules = {n: 0 for n in self.unused_embeddings()}
        if bits is not None:
            if bits == 0:
                raise ValueError("the VLM's token embedding is read by every forward: give it 2..8 or 16 bits, not 0")
            rules[VLM_EMBEDDING] = bits
        plans, kept_float = embedding_plans(self.model, rules, role_of=self.role_of)
        if kept_float:  # π0 has no tied tables; a changed transformers could add some
            raise ValueError(f"π0 embeddings that cannot be packed: {kept_float}")
        return plans

    # ---- actions
    def check_batch(self, batch: Batch) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        unknown = [k for k in batch if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
        if missing or unknown:
            raise ValueError(
                f"π0 batch: missing keys {missing}, unknown keys {unknown}; expected {list(REQUIRED_KEYS)} "
                f"(+ optional {list(OPTIONAL_KEYS)}), see qvla_quant.adapters.pi0 for shapes"
            )
        pv = batch["pixel_values"]
        if pv.dim() != 5:
            raise ValueError(f"π0 batch: pixel_values must be [B, cameras, 3, S, S], got {tuple(pv.shape)}")
        if tuple(batch["pixel_attention_mask"].shape) != tuple(pv.shape[:2]):
            raise ValueError(
                f"π0 batch: pixel_attention_mask {tuple(batch['pixel_attention_mask'].shape)} must be [B, cameras] "
                f"= {tuple(pv.shape[:2])}"
            )
        self.batch_size(batch)

    def actions(self, batch: Batch, noise: torch.Tensor | None) -> torch.Tensor:
        self.check_batch(batch)
        batch = self.to_device(batch)
        dtype = self.dtype
        if noise is None:
            noise = self.make_noise(self.batch_size(batch), self.noise_seed)
        chunk = self._sample(
            self.model,
            state=batch["state"].to(dtype),
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"].to(dtype),
            noise=noise.to(device=self.device, dtype=dtype),
            attention_mask=batch.get("attention_mask"),
            pixel_attention_mask=batch["pixel_attention_mask"].bool(),
            num_steps=self.num_steps,
        )
        return chunk[:, : self.action_steps, : self.action_dim]

    # ---- the VLM prefix, computed once (exact sensitivity of the action expert's layers)
    def downstream_of_prefix(self, name: str) -> bool:
        # the action expert and its in/out heads run only in the denoising loop, after the VLM's KV cache is built
        return self.role_of(name) in ("action", "action_head")

    def prefix_cache(self, batch: Batch) -> _Pi0Prefix | None:
        """The VLM's KV cache of the batch's images and text, exactly as `sample_actions` builds it (step 2), as
        plain per-layer (key, value) tensors; None if the cache is not a plain DynamicCache (then every call
        recomputes it)."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        self.check_batch(batch)
        batch = self.to_device(batch)
        model = self.model
        attention_mask = batch.get("attention_mask")
        position_ids = None if attention_mask is None else attention_mask.cumsum(-1) - 1
        inputs_embeds = model.model.embed_prefix(
            batch["input_ids"], batch["pixel_values"].to(self.dtype), batch["pixel_attention_mask"].bool()
        )
        token_type_ids = torch.zeros_like(inputs_embeds)[:, :, 0]
        cache = model.model.vlm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            use_cache=True,
        ).cache
        if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None  # pragma: no cover - a sliding-window or quantized cache: not reproduced here
        kv = tuple((layer.keys, layer.values) for layer in cache.layers)
        return _Pi0Prefix(kv=kv, size=self.batch_size(batch))

    def actions_from_prefix(self, prefix, batch: Batch, noise: torch.Tensor | None) -> torch.Tensor:
        """`sample_actions`' denoising loop (step 3, the same operations) on a fresh DynamicCache filled from
        `prefix`: the stored tensors are never written to (DynamicLayer.update concatenates into new tensors and
        `crop` slices), so one prefix serves any number of calls."""
        if prefix is None:
            return self.actions(batch, noise)
        from transformers.cache_utils import DynamicCache

        self.check_batch(batch)
        batch = self.to_device(batch)
        dtype = self.dtype
        size = self.batch_size(batch)
        if size != prefix.size:
            raise ValueError(f"π0 prefix was computed for {prefix.size} samples, the batch has {size}")
        if noise is None:
            noise = self.make_noise(size, self.noise_seed)
        model = self.model
        cache = DynamicCache(ddp_cache_data=prefix.kv)
        prefix_length = cache.get_seq_length()
        state = batch["state"].to(dtype)
        attention_mask = batch.get("attention_mask")
        pixel_attention_mask = batch["pixel_attention_mask"].bool()
        noise = noise.to(device=self.device, dtype=dtype)
        num_steps = self.num_steps or model.config.num_inference_steps
        dt = -1.0 / num_steps
        for step in range(num_steps):
            time = 1.0 + step * dt
            time_tensor = torch.full((size,), time, dtype=torch.float32, device=self.device)
            output = model(
                state=state,
                noise=noise,
                timestep=time_tensor,
                pixel_attention_mask=pixel_attention_mask,
                attention_mask=attention_mask,
                cache=cache,
            )
            cache.crop(prefix_length - cache.get_seq_length())
            noise = noise + dt * output.logits
        return noise[:, : self.action_steps, : self.action_dim]

    def make_noise(self, batch_size: int, seed: int) -> torch.Tensor:
        config = self.model.config
        # drawn on the CPU in fp32 so that a seed means the same noise on every device and dtype
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(batch_size, config.chunk_size, config.max_action_dim, generator=gen)
        return noise.to(device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        # the token embedding's source dtype; a PackedEmbedding reports it too (its `weight` is a meta stand-in)
        return self.model.model.vlm.get_input_embeddings().weight.dtype

    # ---- loading and rebuilding
    @classmethod
    def can_load(cls, path) -> bool:
        config = Path(path) / "config.json"
        if not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("model_type") == "pi0"
        except (OSError, ValueError):
            return False

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        action_dim: int | None = None,
        num_steps: int | None = None,
        noise_seed: int = 0,
        action_steps: int | None = None,
    ) -> Pi0Adapter:
        """Load a π0 checkpoint from a local directory (config.json + model.safetensors); never downloads, never
        unpickles, and refuses missing, unexpected or mismatched tensors (`qvla_quant.checkpoint`)."""

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"π0 checkpoint directory {str(path)!r} does not exist")
        if not cls.can_load(path):
            raise ValueError(f"{str(path)!r} is not a π0 checkpoint (config.json with model_type 'pi0' expected)")
        _, model_cls = _transformers_pi0()
        model = load_pretrained_strict(model_cls, path, dtype=dtype, device=device)
        return cls(model, action_dim=action_dim, num_steps=num_steps, noise_seed=noise_seed, action_steps=action_steps)

    def config_dict(self) -> dict:
        d = {
            "adapter": self.name,
            "model_config": self.model.config.to_dict(),
            "action_dim": self.action_dim,
            "num_steps": self.num_steps,
            "noise_seed": self.noise_seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.action_steps is not None:  # only then: stores and artifacts of whole-chunk adapters keep their keys
            d["action_steps"] = self.action_steps
        return d

    @classmethod
    def from_config(cls, config: dict, *, model=None, device: str | torch.device = "meta", **overrides) -> Pi0Adapter:
        """A skeleton: the architecture in the source dtype, weights not initialized (or `model`, wrapped as is).
        `overrides` (action_dim, num_steps, noise_seed, action_steps) replace the stored adapter settings.

        On the meta device by default (no memory): only `qvla_quant.artifact.load_artifact` can fill such a
        skeleton, since it also restores π0's non-persistent buffers (rotary frequencies, the sinusoidal time
        embedding, SigLIP position ids), which the constructors compute and no checkpoint holds. With
        device="cpu" the buffers are computed and the weights are allocated uninitialized.
        """
        from transformers.initialization import no_init_weights

        if model is None:
            config_cls, model_cls = _transformers_pi0()
            if "model_config" not in config:
                raise ValueError("π0 adapter config lacks 'model_config' (expected PolicyAdapter.config_dict() output)")
            model_config = config_cls.from_dict(config["model_config"])
            dtype = getattr(torch, config.get("dtype", "float32"), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"π0 adapter config: unknown dtype {config.get('dtype')!r}")
            with torch.device(device), no_init_weights():
                model = model_cls(model_config)
            model.to(dtype).eval()
        unknown = set(overrides) - {"action_dim", "num_steps", "noise_seed", "action_steps"}
        if unknown:
            raise TypeError(f"Pi0Adapter.from_config: unexpected arguments {sorted(unknown)}")
        settings = {"action_dim": config.get("action_dim"), "num_steps": config.get("num_steps")}
        settings["noise_seed"] = config.get("noise_seed", 0)
        settings["action_steps"] = config.get("action_steps")
        settings.update(overrides)
        return cls(model, **settings)


# ---- configurations for tests and benchmarks (random weights; real checkpoints come from a local directory)
def tiny_pi0_config(**overrides):
    """A π0 small enough for unit tests on a 2-core CPU (~0.1 s per denoising loop), with every part present:
    2-layer SigLIP (32 px images, 8 px patches: 16 tokens per camera), 2-layer Gemma VLM, 2-layer action expert."""
    config_cls, _ = _transformers_pi0()
    kwargs = dict(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(
                model_type="gemma", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=300,
            ),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, patch_size=8, image_size=32, vision_use_head=False,
            ),
            projection_dim=64,
            image_token_id=299,
        ),
        dit_config=dict(
            model_type="gemma", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        ),
        chunk_size=5, max_state_dim=8, max_action_dim=6, num_inference_steps=3,
    )  # fmt: skip
    kwargs.update(overrides)
    return config_cls(**kwargs)


def random_pi0_config(scale: float = 1.0, **overrides):
    """A larger π0-shaped model for benchmarks: 4-layer SigLIP (64 px, 16 px patches), 4-layer Gemma VLM and
    4-layer action expert, widths multiplied by `scale` (1.0: VLM 256, vision 128, expert 128; ~6 M quantizable
    weights), π0's real chunk (50 steps x 32 padded action dims) and 10 denoising steps."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    config_cls, _ = _transformers_pi0()

    def w(x):  # widths stay multiples of the 64-wide heads
        return max(64, int(round(x * scale / 64)) * 64)

    head_dim = 64
    kwargs = dict(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(
                model_type="gemma", hidden_size=w(256), num_hidden_layers=4, intermediate_size=w(1024),
                num_attention_heads=w(256) // head_dim, num_key_value_heads=1, head_dim=head_dim, vocab_size=1024,
            ),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=w(128), intermediate_size=w(512), num_hidden_layers=4,
                num_attention_heads=w(128) // head_dim, patch_size=16, image_size=64, vision_use_head=False,
            ),
            projection_dim=w(256),
            image_token_id=1023,
        ),
        dit_config=dict(
            model_type="gemma", hidden_size=w(128), num_hidden_layers=4, intermediate_size=w(512),
            num_attention_heads=w(256) // head_dim, num_key_value_heads=1, head_dim=head_dim,
        ),
        chunk_size=50, max_state_dim=32, max_action_dim=32, num_inference_steps=10,
    )  # fmt: skip
    kwargs.update(overrides)
    return config_cls(**kwargs)


def published_pi0_config(scale: float = 1.0, **overrides):
    """π0 at its published size, transformers' `PI0Config()` defaults (PaliGemma: Gemma-2B text model, width 2048,
    18 layers, MLP 16384, 8 heads x 256, vocabulary 257,152; SigLIP so400m: width 1152, 27 layers, 224 px images in
    14 px patches; action expert Gemma-300M: width 1024, 18 layers, MLP 4096; 3.50 B parameters, 7.00 GB in bf16).

    `scale` < 1 shrinks it for quick benchmark runs, depth and image kept: every width and the vocabulary are
    multiplied by `scale` (head sizes kept: 256 for the Gemmas, 72 for SigLIP, so the head counts shrink instead).
    scale = 1 is exactly `PI0Config()`."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    config_cls, _ = _transformers_pi0()
    if scale == 1.0 and not overrides:
        return config_cls()

    def heads(n):
        return max(1, round(n * scale))

    vocab = max(64, round(257152 * scale))
    kwargs = dict(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(
                model_type="gemma", hidden_size=heads(8) * 256, num_hidden_layers=18,
                intermediate_size=max(64, round(16384 * scale)), num_attention_heads=heads(8), num_key_value_heads=1,
                head_dim=256, vocab_size=vocab,
            ),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=heads(16) * 72,
                intermediate_size=max(64, round(4304 * scale)), num_hidden_layers=27, num_attention_heads=heads(16),
                patch_size=14, image_size=224, vision_use_head=False,
            ),
            projection_dim=heads(8) * 256,
            image_token_id=vocab,
        ),
        dit_config=dict(
            model_type="gemma", hidden_size=max(64, round(1024 * scale)), num_hidden_layers=18,
            intermediate_size=max(64, round(4096 * scale)), num_attention_heads=heads(8), num_key_value_heads=1,
            head_dim=256,
        ),
    )  # fmt: skip
    kwargs.update(overrides)
    return config_cls(**kwargs)


def example_batch(config, batch_size: int = 2, *, n_cameras: int = 2, text_len: int = 6, seed: int = 0) -> Batch:
    """Random but fixed model inputs in the documented batch format (for tests and benchmarks, not robot data).

    Sample i > 0 has a shorter instruction (right padding) and, with more than one camera, its last camera slot
    missing (masked, and no image tokens for it in the prompt), so that padding and missing cameras are exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    vision = config.vlm_config.vision_config
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2
    image_token = config.vlm_config.image_token_id
    vocab = config.vlm_config.text_config.vocab_size
    length = tokens_per_image * n_cameras + text_len
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    pixel_attention_mask = torch.ones(batch_size, n_cameras, dtype=torch.bool)
    for i in range(batch_size):
        if i > 0 and n_cameras > 1:
            pixel_attention_mask[i, -1] = False
        n_image = tokens_per_image * int(pixel_attention_mask[i].sum())
        n_text = text_len - min(i, text_len - 1)
        text = torch.randint(1, vocab, (n_text,), generator=gen)
        text[text == image_token] = 1
        # like PI0Processor: the present cameras' image tokens, then the instruction, then right padding
        input_ids[i, :n_image] = image_token
        input_ids[i, n_image : n_image + n_text] = text
        attention_mask[i, : n_image + n_text] = 1
    pixel_values = torch.randn(batch_size, n_cameras, 3, vision.image_size, vision.image_size, generator=gen)
    pixel_values[~pixel_attention_mask] = 0
    n_state = min(14, config.max_state_dim)
    state = torch.zeros(batch_size, config.max_state_dim)
    state[:, :n_state] = torch.randn(batch_size, n_state, generator=gen)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_attention_mask,
        "state": state,
    }
