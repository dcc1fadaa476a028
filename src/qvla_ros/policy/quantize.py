"""Quantize a π0 policy with QVLA from recorded episodes: the offline calibration job, end to end.

    qvla-policy-quantize --policy models/sim_transfer_cube_fp --episodes data/demos --budget 4 \\
        --out models/sim_transfer_cube_qvla_w4

episodes -> observations (the same processor the robot uses) -> model batches -> qvla_quant.calibrate
(action-space sensitivities, resumable under <out>/sensitivity) -> qvla_quant.allocate (bits per row under the
budget) -> qvla_quant.quantize + save (packed artifact) + the policy's processor files, so that
`PolicyRuntime.load(<out>)` runs the quantized policy with no other input. Plots of the sensitivities and of the
bit allocation are written to <out>/plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qvla_ros.policy.model import load_pi0_model
from qvla_ros.policy.processor import PROCESSOR_FILE, TOKENIZER_FILE, Pi0Processor, one_line
from qvla_ros.policy.types import Observation


@dataclass
class CalibrationData:
    """Model-input batches drawn from episodes, and where they came from."""

    batches: list[dict[str, torch.Tensor]]
    sources: list[tuple[str, int]]  # (episode name, sample index) per sample, in batch order


def episode_observations(episode_paths, samples_per_episode: int, horizon: int, seed: int = 0):
    """Evenly spaced observations (with a seeded offset) from each episode, as (name, index, Observation)."""
    from qvla_ros.episodes.reader import read_episode

    rng = np.random.default_rng(seed)
    for path in episode_paths:
        ep = read_episode(path, horizon=horizon)
        n = len(ep.samples)
        k = min(samples_per_episode, n)
        offset = int(rng.integers(0, max(1, n // k)))
        for i in np.linspace(offset, n - 1, k).astype(int):
            s = ep.samples[i]
            yield (
                Path(path).name,
                int(i),
                Observation(images=dict(s.images), state=s.state, instruction=s.instruction, stamp=s.timestamp),
            )


def calibration_batches(
    episode_paths, processor: Pi0Processor, samples_per_episode: int = 4, batch_size: int = 8, seed: int = 0
) -> CalibrationData:
    obs, sources = [], []
    for name, i, o in episode_observations(episode_paths, samples_per_episode, processor.config.chunk_size, seed):
        obs.append(o)
        sources.append((name, i))
    if not obs:
        raise ValueError("no calibration samples: the episode list is empty")
    batches = [processor.batch(obs[i : i + batch_size]) for i in range(0, len(obs), batch_size)]
    return CalibrationData(batches, sources)


def policy_adapter(policy_dir):
    """(processor, qvla_quant Pi0Adapter around the full-precision model) for a policy directory."""
    from qvla_quant import Pi0Adapter

    processor = Pi0Processor.load(policy_dir)
    return processor, Pi0Adapter(load_pi0_model(policy_dir), action_dim=len(processor.config.joint_names))


def calibrate_policy(
    policy_dir,
    episode_paths,
    *,
    calibration=None,
    samples_per_episode: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    store_dir=None,
    loaded=None,
    action_steps: int | None = None,
):
    """Action-space sensitivities of a policy on samples of the episodes. Returns (Sensitivity, info dict).

    loaded: (processor, adapter) of `policy_dir` already in memory (`policy_adapter`), so a caller that goes on
    to quantize loads the float model once; calibration leaves its weights as they were.
    action_steps: measure the action error on the chunk's first `action_steps` steps only (those a robot that
    replans every `action_steps` ticks executes; `Pi0Adapter.action_steps`), None: the whole chunk."""
    from qvla_quant import CalibrationConfig, calibrate

    processor, adapter = loaded or policy_adapter(policy_dir)
    if action_steps is not None:  # a view of the same model; the caller's adapter keeps predicting whole chunks
        adapter = type(adapter).from_config(adapter.config_dict(), model=adapter.model, action_steps=action_steps)
    t0 = time.time()
    data = calibration_batches(episode_paths, processor, samples_per_episode, batch_size, seed)
    cfg = calibration or CalibrationConfig(store_dir=None if store_dir is None else str(store_dir), seed=seed)
    sensitivity = calibrate(adapter, data.batches, cfg)
    info = {
        "samples": len(data.sources),
        "episodes": sorted({n for n, _ in data.sources}),
        "calibration_s": time.time() - t0,
        "config": cfg.to_dict(),
        "action_steps": action_steps,
    }
    return sensitivity, info


def write_quantized_policy(policy_dir, plan, out, *, extra: dict | None = None, plots_of=None, adapter=None) -> Path:
    """Pack the policy with `plan` and write an artifact that PolicyRuntime loads (+ the processor files).

    plots_of: a Sensitivity to plot beside the plan's bit allocation (sensitivity map), or None.
    adapter: the float policy of `policy_dir` already loaded (it is quantized in place), else it is loaded here.
    """
    from qvla_quant import quantize, save

    policy_dir, out = Path(policy_dir), Path(out)
    if adapter is None:
        _, adapter = policy_adapter(policy_dir)
    quantize(adapter, plan)
    path = save(out, adapter, plan, extra={"policy_source": str(policy_dir), **(extra or {})})
    for name in (PROCESSOR_FILE, TOKENIZER_FILE):
        shutil.copy2(policy_dir / name, out / name)
    from qvla_quant.report import plot_plan, plot_sensitivity

    plot_plan(plan, out / "plots")
    if plots_of is not None:
        plot_sensitivity(plots_of, out / "plots")
    return path


def quantize_policy(
    policy_dir,
    episode_paths,
    out,
    budget: float,
    *,
    calibration=None,
    allocation=None,
    samples_per_episode: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    embedding_bits: int | None = None,
) -> tuple[Path, dict]:
    """Calibrate on the episodes, allocate under `budget`, write the packed artifact to `out`.

    calibration / allocation: qvla_quant CalibrationConfig / AllocationConfig (defaults: the paper's two-stage
    sensitivity, resumable under <out>/sensitivity, and greedy demotion). embedding_bits: store the token-embedding
    table at this many bits (`qvla_quant.api.with_embeddings`; None: it stays float). Returns (artifact path,
    summary).
    """
    from qvla_quant import AllocationConfig, allocate
    from qvla_quant.api import with_embeddings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = policy_adapter(policy_dir)  # the float model, loaded once for calibration and packing
    sensitivity, info = calibrate_policy(
        policy_dir,
        episode_paths,
        calibration=calibration,
        samples_per_episode=samples_per_episode,
        batch_size=batch_size,
        seed=seed,
        store_dir=out / "sensitivity",
        loaded=loaded,
    )
    t1 = time.time()
    plan = with_embeddings(allocate(sensitivity, budget, allocation or AllocationConfig()), loaded[1], embedding_bits)
    path = write_quantized_policy(
        policy_dir, plan, out, extra={"calibration": info}, plots_of=sensitivity, adapter=loaded[1]
    )
    from qvla_quant.artifact import artifact_summary

    stored = artifact_summary(path)  # the per-row overhead beside the plan's average bits
    summary = {
        "artifact": str(path),
        "budget": budget,
        "average_bits": plan.average_bits(),
        "overhead_bits_per_weight": stored.get("overhead_bits_per_weight"),
        "average_bits_stored": stored.get("average_bits_stored"),
        "pruned_fraction": plan.pruned_fraction(),
        "allocation_s": time.time() - t1,
        **info,
    }
    (out / "calibration_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return path, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qvla-policy-quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="full-precision policy directory")
    p.add_argument("--episodes", required=True, help="directory of recorded episodes (rosbag2/MCAP)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--budget", type=float, required=True, help="average bits per weight, e.g. 4")
    p.add_argument("--max-episodes", type=int, default=16, help="episodes to draw calibration samples from")
    p.add_argument("--samples-per-episode", type=int, default=4)
    p.add_argument("--solver", choices=("greedy", "lagrangian"), default="greedy")
    p.add_argument("--bits", default="0,2,4,8,16", help="candidate bit-widths per channel")
    p.add_argument("--prune-abs-threshold", type=float, help="never prune a channel whose s(0) is above this")
    p.add_argument(
        "--prune-rel-threshold",
        type=float,
        help="never prune a channel whose s(0) is above this times its layer's median s(0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--embedding-bits",
        type=int,
        choices=(2, 3, 4, 6, 8, 16),
        help="also store the VLM's token-embedding table at this many bits (the action expert's unused one is then "
        "not stored); default: the tables stay float",
    )
    args = p.parse_args(argv)
    from qvla_quant import AllocationConfig, BudgetError
    from qvla_ros.episodes.reader import EpisodeError

    try:
        episodes = sorted(x for x in Path(args.episodes).iterdir() if not x.name.startswith("."))[: args.max_episodes]
        bits = tuple(int(b) for b in args.bits.split(","))
        path, summary = quantize_policy(
            args.policy,
            episodes,
            args.out,
            args.budget,
            allocation=AllocationConfig(
                bits=bits,
                solver=args.solver,
                prune_abs_threshold=args.prune_abs_threshold,
                prune_rel_threshold=args.prune_rel_threshold,
            ),
            samples_per_episode=args.samples_per_episode,
            seed=args.seed,
            embedding_bits=args.embedding_bits,
        )
    except (ValueError, OSError, KeyError, BudgetError, EpisodeError) as exc:
        print(f"qvla-policy-quantize: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
