"""Train a small π0-architecture policy on recorded episodes (rosbag2/MCAP), on a CPU, resumable.

    qvla-train --episodes data/demos --out runs/pi0_transfer_cube --steps 20000

Episodes are read once (qvla_ros.episodes.reader), camera images resized to the vision tower's size and kept
in memory as uint8; the policy is trained with π0's own flow-matching loss (`PI0ForConditionalGeneration`
with `actions=`). Every `--checkpoint-every` steps the run directory gets a complete policy directory
(`last/`: loadable by PolicyRuntime) plus the optimizer state, so an interrupted run resumes where it stopped
with `--resume`. Seeds fix the model initialization, the train/validation split and the batch order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qvla_ros.policy.model import SmallPi0Spec, load_pi0_model, save_policy, small_pi0_config
from qvla_ros.policy.processor import Normalizer, Pi0Processor, one_line
from qvla_ros.policy.tiny import make_processor


@dataclass
class TrainConfig:
    episodes: str
    out: str
    spec: SmallPi0Spec = field(default_factory=SmallPi0Spec)
    steps: int = 20000
    batch_size: int = 32
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0  # model init and batch order
    data_seed: int = 0  # train/validation split
    val_episodes: int = 2
    checkpoint_every: int = 1000
    # random image shift in pixels (of the resized image); 0 = off. Off by default: with a fixed top camera the
    # cube's pixel position IS the signal, and a shift of a few pixels at ~1 cm/pixel taught a policy to ignore it
    shift_augment: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    init_from: str | None = None  # start from this policy's weights and processor (fine-tuning) instead of random
    # Auxiliary localization loss (training only, nothing of it is saved in the policy): a linear head on the first
    # camera's projected image tokens regresses the objects' initial xy, on frames before the task first moves
    # them. The flow-matching loss alone left the vision tower ignoring where the cube is (the policy reached for
    # the average cube position); this makes the image tokens carry it. Needs episodes whose metadata gives the
    # initial object poses (sim recordings); 0 = off.
    object_aux_weight: float = 0.0
    object_aux_until_s: float = 2.4  # the scripted expert lifts the cube at 2.6 s
    # Probability that a sample's wrist cameras (all cameras after the first) are blanked to mid-gray. A policy
    # trained with all three learned to steer by the wrist views alone and barely reacted to the top camera
    # (swapping in another scene's top image moved its 1 s target ~10x less than the expert's), so it had no idea
    # where the cube was until a wrist camera saw it; dropping the wrist views makes the top view carry the task.
    wrist_dropout: float = 0.0
    # Probability that a sample's state input is replaced by the dataset mean (0 after normalization). In the
    # demonstrations the arm always heads for the cube, so a policy can read the cube's place off the arm's own
    # trajectory: it fit the training chunks closely after the first second yet never corrected a first chunk
    # that was 2 cm off (it followed its own arm). Without the state it has to look.
    state_dropout: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["spec"] = SmallPi0Spec(**d["spec"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class SampleSet:
    """All training samples in memory: images uint8 [N, n_cam, S, S, 3], state [N, J], actions [N, H, J],
    instruction index per sample and the instruction strings, and which episode each sample came from."""

    images: torch.Tensor
    state: np.ndarray
    actions: np.ndarray
    instruction_idx: np.ndarray
    instructions: list[str]
    episode_idx: np.ndarray
    timestamps: np.ndarray  # seconds since the episode's start
    object_xy: np.ndarray  # [N, 2 * n_objects] the episode's initial object positions (NaN when unknown)

    def __len__(self) -> int:
        return len(self.state)


def resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """[n, H, W, 3] uint8 -> [n, size, size, 3] uint8 with the same antialiased resize the processor uses."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def initial_object_xy(metadata: dict) -> np.ndarray | None:
    """The objects' initial xy positions of an episode from its metadata: `initial_object_poses` as the sim
    recorder writes it, or, for sim recordings made before it did, reproduced from the task and seed (the sim
    places objects deterministically per seed). None for episodes that carry neither (real teleoperation)."""
    poses = metadata.get("initial_object_poses")
    if poses is None and metadata.get("source") == "sim" and "seed" in metadata and "task" in metadata:
        from qvla_ros.sim.rig import sample_object_poses

        poses = sample_object_poses(metadata["task"], int(metadata["seed"])).reshape(-1, 7).tolist()
    if poses is None:
        return None
    return np.asarray(poses, dtype=np.float32).reshape(-1, 7)[:, :2].reshape(-1)


def load_samples(
    episode_paths: list[Path],
    camera_names: list[str],
    image_size: int,
    horizon: int,
    rate_hz: float = 30.0,
    progress: bool = True,
) -> SampleSet:
    from tqdm import tqdm

    from qvla_ros.episodes.reader import read_episode

    images, states, actions, instr_idx, ep_idx, stamps, obj_xy = [], [], [], [], [], [], []
    instructions: list[str] = []
    for e, path in enumerate(tqdm(episode_paths, desc="reading episodes", disable=not progress, unit="ep")):
        episode = read_episode(path, horizon=horizon, rate_hz=rate_hz)
        xy = initial_object_xy(episode.metadata)
        for start in range(0, len(episode.samples), 64):
            block = episode.samples[start : start + 64]
            cams = np.stack([s.images[name] for s in block for name in camera_names])
            small = resize_uint8(cams, image_size)
            images.append(small.reshape(len(block), len(camera_names), *small.shape[1:]).clone())
        for s in episode.samples:
            states.append(np.asarray(s.state, dtype=np.float32))
            actions.append(np.asarray(s.actions, dtype=np.float32))
            if s.instruction not in instructions:
                instructions.append(s.instruction)
            instr_idx.append(instructions.index(s.instruction))
            ep_idx.append(e)
            stamps.append(s.timestamp)
            obj_xy.append(xy)
        del episode
        _release_freed_memory()
    if not states:
        raise ValueError(f"no samples in {len(episode_paths)} episodes")
    width = max((len(v) for v in obj_xy if v is not None), default=0)
    objects = np.full((len(states), width), np.nan, dtype=np.float32)
    for i, v in enumerate(obj_xy):
        if v is not None and len(v) == width:
            objects[i] = v
    return SampleSet(
        torch.cat(images),
        np.stack(states),
        np.stack(actions),
        np.asarray(instr_idx),
        instructions,
        np.asarray(ep_idx),
        np.asarray(stamps, dtype=np.float64),
        objects,
    )


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS. Decoding an episode allocates hundreds of MB of image buffers that
    glibc keeps on its heap after they are freed; without this the process grew by ~150 MB per episode and was
    OOM-killed after ~90 of 100 episodes on a 24 GB machine."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def make_batch(
    samples: SampleSet,
    idx: np.ndarray,
    processor: Pi0Processor,
    shift: int,
    rng: np.random.Generator,
    wrist_dropout: float = 0.0,
    state_dropout: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Model inputs + normalized target actions for the samples `idx` (with random-shift augmentation,
    wrist-camera dropout and state dropout, see TrainConfig)."""
    imgs = samples.images[torch.as_tensor(idx)]  # [B, n, S, S, 3] uint8
    x = imgs.permute(0, 1, 4, 2, 3).float()  # [B, n, 3, S, S]
    if wrist_dropout > 0 and x.shape[1] > 1:
        drop = torch.from_numpy(rng.random(len(idx)) < wrist_dropout)
        x[drop, 1:] = 127.5  # mid-gray: 0 after the [-1, 1] normalization
    if shift > 0:
        # DrQ-style random shift: pad by replication and crop back, per image; keeps the cube's apparent
        # position from being memorized pixel-exactly with only tens of demonstrations
        b, n, c, s, _ = x.shape
        flat = F.pad(x.reshape(b * n, c, s, s), (shift,) * 4, mode="replicate")
        offs = rng.integers(0, 2 * shift + 1, size=(b * n, 2))
        x = torch.stack([flat[i, :, oy : oy + s, ox : ox + s] for i, (oy, ox) in enumerate(offs)]).reshape(
            b, n, c, s, s
        )
    pixel_values = x / 127.5 - 1.0
    ids, mask = processor.text_tensors([samples.instructions[i] for i in samples.instruction_idx[idx]])
    state = processor.state_tensor(list(samples.state[idx]))
    if state_dropout > 0:
        state[torch.from_numpy(rng.random(len(idx)) < state_dropout)] = 0.0  # the normalized dataset mean
    return {
        "pixel_values": pixel_values,
        "pixel_attention_mask": torch.ones(pixel_values.shape[:2], dtype=torch.bool),
        "input_ids": ids,
        "attention_mask": mask,
        "state": state,
        "actions": processor.actions_to_model(samples.actions[idx]),
    }


class ObjectLocalizationAux:
    """The auxiliary localization loss of TrainConfig.object_aux_weight: captures the projected image tokens of
    the model's own forward pass (a hook on the multimodal projector, so no second vision pass) and regresses the
    standardized initial object xy from the first camera's tokens with a linear head."""

    def __init__(self, model, samples: SampleSet, train_idx: np.ndarray, cfg: TrainConfig, n_cameras: int):
        projectors = [m for n, m in model.named_modules() if n.endswith("multi_modal_projector")]
        if len(projectors) != 1:
            raise ValueError("object_aux_weight needs a π0 model with one multimodal projector")
        known = np.isfinite(samples.object_xy).all(axis=1) & (samples.object_xy.shape[1] > 0)
        usable = known & (samples.timestamps < cfg.object_aux_until_s)
        if not usable[train_idx].any():
            raise ValueError(
                "object_aux_weight > 0 but no training episode's metadata gives initial object poses "
                "(sim recordings do); train with --object-aux-weight 0"
            )
        self.usable = usable
        fit = samples.object_xy[train_idx[usable[train_idx]]]
        self.mean, self.std = fit.mean(0), fit.std(0) + 1e-6
        self.samples, self.n_cameras, self.weight = samples, n_cameras, cfg.object_aux_weight
        tokens = model.config.vlm_config.text_config.num_image_tokens
        width = model.config.vlm_config.text_config.hidden_size
        self.head = torch.nn.Linear(tokens * width, samples.object_xy.shape[1])
        torch.nn.init.zeros_(self.head.weight)
        self._features = None
        projectors[0].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._features = output

    def loss(self, idx: np.ndarray) -> torch.Tensor | None:
        feats, self._features = self._features, None
        mask = self.usable[idx]
        if feats is None or not mask.any():
            return None
        first_camera = feats.reshape(len(idx), self.n_cameras, -1)[:, 0]
        target = torch.from_numpy((self.samples.object_xy[idx] - self.mean) / self.std)
        m = torch.from_numpy(mask)
        return self.weight * F.mse_loss(self.head(first_camera[m]), target[m])


# ---------------------------------------------------------------------------------------------------- training
def list_episodes(directory) -> list[Path]:
    paths = sorted(p for p in Path(directory).iterdir() if not p.name.startswith("."))
    if not paths:
        raise ValueError(f"no episodes in {directory}")
    return paths


def validation_split(n_episodes: int, n_val: int, data_seed: int) -> list[int]:
    """Indices (into the sorted episode list) of the held-out episodes. Depends on data_seed only, so a resumed
    run, and the benchmarks, use the same held-out episodes as the training run."""
    if n_episodes <= n_val:
        raise ValueError(f"{n_episodes} episodes; need more than val_episodes={n_val}")
    return sorted(np.random.default_rng(data_seed).permutation(n_episodes)[:n_val].tolist())


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def validation_loss(
    model, samples: SampleSet, idx: np.ndarray, processor: Pi0Processor, batch_size: int, seed: int = 1234
) -> float:
    """Flow-matching loss on held-out samples with fixed noise and times (comparable across checkpoints)."""
    if len(idx) == 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(idx), batch_size):
        sel = idx[start : start + batch_size]
        batch = make_batch(samples, sel, processor, 0, np.random.default_rng(0))
        b = len(sel)
        noise = torch.randn(b, model.config.chunk_size, model.config.max_action_dim, generator=gen)
        t = torch.rand(b, generator=gen) * 0.999 + 0.001
        out = model(**batch, noise=noise, timestep=t)
        total += float(out.loss) * b
        n += b
    model.train()
    return total / n


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train and return the directory of the final policy (`<out>/final`)."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import PI0ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last"

    episode_paths = list_episodes(cfg.episodes)
    val_eps = set(validation_split(len(episode_paths), cfg.val_episodes, cfg.data_seed))

    spec = cfg.spec
    from qvla_ros.policy.tiny import BIMANUAL_JOINTS, CAMERAS

    samples = load_samples(episode_paths, CAMERAS, spec.image_size, spec.chunk_size, progress=progress)
    is_val = np.isin(samples.episode_idx, list(val_eps))
    train_idx, val_idx = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]

    if resume and (last / "config.json").is_file():
        processor = Pi0Processor.load(last)
        model = load_pi0_model(last).train()
        state = read_json_file(out / "train_state.json", "the run's training state")
    elif cfg.init_from:
        # fine-tuning keeps the source's processor (normalization, vocabulary) so its weights stay meaningful
        processor = Pi0Processor.load(cfg.init_from)
        model = load_pi0_model(cfg.init_from).train()
        if model.config.chunk_size != spec.chunk_size or processor.config.image_size != spec.image_size:
            raise ValueError(
                f"--init-from {cfg.init_from} has chunk size {model.config.chunk_size} and image size "
                f"{processor.config.image_size}; the spec asks for {spec.chunk_size} / {spec.image_size}"
            )
        source_info = Path(cfg.init_from) / "train_config.json"
        state = {
            "step": 0,
            "history": [],
            "init_from": str(cfg.init_from),
            # provenance of the starting weights travels with the fine-tuned policy
            "init_from_config": read_json_file(source_info, "the source's training record")
            if source_info.is_file()
            else None,
        }
    else:
        state_norm = Normalizer.fit(samples.state[train_idx])
        action_norm = Normalizer.fit(samples.actions[train_idx])
        processor = make_processor(spec, samples.instructions, BIMANUAL_JOINTS, CAMERAS, state_norm, action_norm)
        torch.manual_seed(cfg.seed)
        config = small_pi0_config(spec, processor.tokenizer.get_vocab_size(), processor.config.image_token_id)
        model = PI0ForConditionalGeneration(config).train()
        state = {"step": 0, "history": []}
    # data never seen at fit time must still tokenize: every instruction of the samples is in the vocabulary
    unknown = [t for t in samples.instructions if processor.tokenizer.token_to_id("<unk>") in processor.prompt_ids(t)]
    if unknown:
        raise ValueError(f"instructions not in the policy's vocabulary: {unknown}")

    aux = None
    if cfg.object_aux_weight > 0:
        aux = ObjectLocalizationAux(model, samples, train_idx, cfg, len(CAMERAS))
        if resume and (out / "aux_head.safetensors").is_file():
            aux.head.load_state_dict(read_tensors_file(out / "aux_head.safetensors"))
    params = list(model.parameters()) + (list(aux.head.parameters()) if aux else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume and (out / "optimizer.safetensors").is_file():
        _load_optimizer(
            opt,
            read_tensors_file(out / "optimizer.safetensors"),
            read_json_file(out / "optimizer.json", "the optimizer state"),
        )

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[train] {len(train_idx)} train / {len(val_idx)} val samples from {len(episode_paths)} episodes; "
        f"model {n_params / 1e6:.2f} M params; steps {state['step']} -> {cfg.steps}",
        flush=True,
    )

    def checkpoint(step: int, val: float | None) -> None:
        info = {
            "train_config": cfg.to_dict(),
            "step": step,
            "val_loss": val,
            # checkpoints are fine-tuned from too: the lineage must survive in every saved policy
            "init_from_config": state.get("init_from_config"),
            "n_train_samples": int(len(train_idx)),
            "n_val_samples": int(len(val_idx)),
            "episodes": [p.name for p in episode_paths],
            "val_episodes": sorted(episode_paths[i].name for i in val_eps),
        }
        tmp = out / "last.tmp"
        save_policy(tmp, model, processor, info)
        tensors, meta = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        # swap in atomically-ish: a crash during the write leaves the previous `last` intact
        if last.exists():
            _rmtree(last)
        tmp.rename(last)
        (last / "optimizer.safetensors").replace(out / "optimizer.safetensors")
        (last / "optimizer.json").replace(out / "optimizer.json")
        if aux is not None:
            save_file({k: v.contiguous() for k, v in aux.head.state_dict().items()}, str(out / "aux_head.safetensors"))
        state["step"] = step
        (out / "train_state.json").write_text(json.dumps(state, indent=1))

    rng = np.random.default_rng([cfg.seed, state["step"]])
    torch.manual_seed(cfg.seed + state["step"])
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", disable=not progress, unit="step", mininterval=5.0)
    step, t_start, ema, aux_ema = state["step"], time.time(), None, None
    model.train()
    while step < cfg.steps:
        idx = rng.choice(train_idx, size=min(cfg.batch_size, len(train_idx)), replace=False)
        batch = make_batch(samples, idx, processor, cfg.shift_augment, rng, cfg.wrist_dropout, cfg.state_dropout)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = model(**batch).loss
        value = loss.item()  # the flow-matching loss alone, comparable with runs without the auxiliary loss
        if aux is not None:
            aux_loss = aux.loss(idx)
            if aux_loss is not None:
                loss = loss + aux_loss
                aux_ema = aux_loss.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        extra = {} if aux_ema is None else {"aux": f"{aux_ema:.4f}"}
        bar.set_postfix(loss=f"{ema:.4f}", **extra, lr=f"{lr_at(step, cfg):.1e}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            val = validation_loss(model, samples, val_idx, processor, cfg.batch_size)
            state["history"].append(
                {
                    "step": step,
                    "train_loss_ema": ema,
                    "val_loss": val,
                    "object_aux_loss_ema": aux_ema,
                    "elapsed_s": time.time() - t_start,
                }
            )
            aux_text = "" if aux_ema is None else f", localization loss (ema) {aux_ema:.4f}"
            print(f"[train] step {step}: train loss (ema) {ema:.4f}, val loss {val:.4f}{aux_text}", flush=True)
            checkpoint(step, val)
    bar.close()
    final = out / "final"
    if final.exists():
        _rmtree(final)
    save_policy(
        final,
        model.eval(),
        processor,
        {
            "train_config": cfg.to_dict(),
            "step": step,
            "history": state["history"],
            "init_from_config": state.get("init_from_config"),
            "episodes": [p.name for p in episode_paths],
            "val_episodes": sorted(episode_paths[i].name for i in val_eps),
        },
    )
    return final


def read_json_file(path: Path, what: str):
    """A JSON file of a run or policy directory; a damaged one is named, with what to do."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found ({what})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({one_line(exc)}): the file holding {what} is damaged; "
            "restore it from a copy (or train again)"
        ) from None


def read_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of the run directory (never pickle); a damaged one is named, with what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} cannot be read as safetensors ({one_line(exc)}): the file is damaged; delete it "
            "to resume without it, or start the run again"
        ) from None


def train_config_of(path: Path, spec_only: bool = False) -> TrainConfig:
    """The TrainConfig recorded in a policy's train_config.json (spec_only: only its model spec is read, the rest
    is left at the defaults)."""
    record = read_json_file(path, "how the policy was trained")
    try:
        if spec_only:
            return TrainConfig(episodes="", out="", spec=SmallPi0Spec(**record["train_config"]["spec"]))
        return TrainConfig.from_dict(record["train_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"{path} does not hold a qvla-train training record ({one_line(exc)}); pass --spec "
            "explicitly, or point at a directory written by qvla-train"
        ) from None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat tensors + JSON (safetensors, never pickle)."""
    tensors, meta = {}, {"param_groups": [], "steps": {}}
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        meta["param_groups"].append({k: v for k, v in g.items() if k != "params"} | {"params": g["params"]})
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qvla-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", required=True, help="directory of recorded episodes (rosbag2/MCAP)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, final policy)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--val-episodes", type=int, default=TrainConfig.val_episodes)
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    p.add_argument("--shift-augment", type=int, default=TrainConfig.shift_augment)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--spec", default="{}", help="JSON overrides of the model size, e.g. '{\"width\": 192}'")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-from", help="fine-tune: start from this policy directory's weights and processor")
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument(
        "--wrist-dropout",
        type=float,
        default=TrainConfig.wrist_dropout,
        help="probability of blanking a sample's wrist cameras (forces use of the top camera)",
    )
    p.add_argument(
        "--state-dropout",
        type=float,
        default=TrainConfig.state_dropout,
        help="probability of replacing a sample's state input by the dataset mean",
    )
    p.add_argument(
        "--object-aux-weight",
        type=float,
        default=TrainConfig.object_aux_weight,
        help="weight of the auxiliary object-localization loss (sim recordings; 0 = off)",
    )
    args = p.parse_args(argv)
    from qvla_ros.episodes.reader import EpisodeError

    out = Path(args.out)
    try:
        if args.resume and (out / "train_state.json").is_file():
            cfg = train_config_of(out / "last" / "train_config.json")
            cfg.steps = args.steps
        else:
            try:
                spec = SmallPi0Spec(**json.loads(args.spec))
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"--spec {args.spec!r} is not a JSON object of SmallPi0Spec fields ({one_line(exc)})"
                ) from None
            if args.init_from and args.spec == "{}":  # the source's own sizes
                spec = train_config_of(Path(args.init_from) / "train_config.json", spec_only=True).spec
            cfg = TrainConfig(
                episodes=args.episodes,
                out=args.out,
                spec=spec,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                data_seed=args.data_seed,
                val_episodes=args.val_episodes,
                checkpoint_every=args.checkpoint_every,
                shift_augment=args.shift_augment,
                threads=args.threads,
                init_from=args.init_from,
                warmup_steps=args.warmup_steps,
                object_aux_weight=args.object_aux_weight,
                wrist_dropout=args.wrist_dropout,
                state_dropout=args.state_dropout,
            )
        final = train(cfg, resume=args.resume)
    except (ValueError, OSError, TypeError, EpisodeError) as exc:  # PolicyFormatError, bad files, bad --spec
        print(f"qvla-train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"[train] final policy: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
