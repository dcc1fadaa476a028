"""Closed-loop evaluation of a policy in the simulated rig: success rate over seeded episodes, and how far its
actions drift from a reference policy's on the same observations (the paper's cumulative Eq. 5).

    qvla-eval --policy models/sim_transfer_cube_fp --seeds 1000-1049
    qvla-eval --policy artifacts/w4 --reference models/sim_transfer_cube_fp --seeds 1000-1049

Each episode: reset the rig with the seed, then at every 30 Hz command tick observe, predict a chunk every
`replan_every` ticks (the chunk's rows are played out in between), command the rig and run its 50 Hz physics
to the next tick. With a reference policy, at every prediction the reference predicts on the same observation;
the per-episode cumulative deviation is sum_t ||A_t - A*_t||_2 over those predictions (whole chunks, in joint
units), and the first-action deviation is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qvla_ros.policy.episode_cache import EpisodeCache
from qvla_ros.policy.processor import one_line
from qvla_ros.policy.runtime import PolicyRuntime
from qvla_ros.policy.types import Observation


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    max_reward: int
    steps: int
    predictions: int
    mean_latency_ms: float
    cumulative_deviation: float | None = None  # Eq. 5 over whole chunks
    cumulative_first_action_deviation: float | None = None
    deviation_curve: list[float] = field(default_factory=list)  # cumulative deviation after each prediction


@dataclass
class EvalReport:
    policy: str
    reference: str | None
    task: str
    episodes: list[EpisodeResult]
    wall_s: float

    @property
    def success_rate(self) -> float:
        return float(np.mean([e.success for e in self.episodes])) if self.episodes else float("nan")

    def summary(self) -> dict:
        d = {
            "policy": self.policy,
            "reference": self.reference,
            "task": self.task,
            "episodes": len(self.episodes),
            "successes": int(sum(e.success for e in self.episodes)),
            "success_rate": self.success_rate,
            "mean_latency_ms": float(np.mean([e.mean_latency_ms for e in self.episodes])),
            "wall_s": self.wall_s,
        }
        if self.reference:
            dev = [e.cumulative_deviation for e in self.episodes]
            d["mean_cumulative_deviation"] = float(np.mean(dev))
            d["mean_cumulative_first_action_deviation"] = float(
                np.mean([e.cumulative_first_action_deviation for e in self.episodes])
            )
        return d

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "episodes": [asdict(e) for e in self.episodes]}


def run_episode(
    rig,
    policy: PolicyRuntime,
    seed: int,
    *,
    steps: int = 240,
    replan_every: int = 10,
    reference: PolicyRuntime | None = None,
    stop_on_success: bool = False,
    blending: str = "latest",
    ensemble_decay: float = 2.0,
) -> EpisodeResult:
    """One closed-loop episode of `steps` 30 Hz command ticks in `rig` (a qvla_ros.sim.rig.SimRig).

    The sim waits for each prediction (no inference latency here: this measures the policy, the ROS benchmarks
    measure the timing). blending: how chunks are played out, with the policy node's ChunkScheduler ("latest":
    each chunk alone until the next; "temporal_ensemble": overlapping chunks averaged, newer ones weighted up).
    """
    from qvla_ros.control.scheduler import ChunkScheduler

    obs = rig.reset(seed=seed)
    period = 1.0 / rig.command_hz
    scheduler = ChunkScheduler(len(policy.joint_names), mode=blending, decay=ensemble_decay, ramp=0.0)
    latencies, curve = [], []
    cum = cum_first = 0.0
    for k in range(steps):
        t = k * period
        if k % replan_every == 0:
            o = Observation(images=obs.images, state=obs.qpos, instruction=rig.instruction, stamp=t)
            chunk = policy.predict(o)
            latencies.append(chunk.latency)
            scheduler.add(chunk.actions, stamp=t, step_period=chunk.step_period, now=t, model_id=chunk.model_id)
            if reference is not None:
                ref = reference.predict(o)
                cum += float(np.linalg.norm(chunk.actions - ref.actions))
                cum_first += float(np.linalg.norm(chunk.actions[0] - ref.actions[0]))
                curve.append(cum)
        target, _ = scheduler.target(t)
        if target is None:  # replan_every longer than the chunk: hold the last row
            target = chunk.actions[-1]
        rig.command(target, stamp=t)
        rig.step_to(t + period)
        if stop_on_success and rig.episode_success:
            break
        obs = rig.observe()
    return EpisodeResult(
        seed=seed,
        success=bool(rig.episode_success),
        max_reward=rig.max_reward_reached,
        steps=k + 1,
        predictions=len(latencies),
        mean_latency_ms=1e3 * float(np.mean(latencies)),
        cumulative_deviation=cum if reference is not None else None,
        cumulative_first_action_deviation=cum_first if reference is not None else None,
        deviation_curve=curve,
    )


def evaluate(
    policy: PolicyRuntime,
    seeds: list[int],
    *,
    task: str = "transfer_cube",
    reference=None,
    steps: int = 240,
    replan_every: int = 10,
    image_size=(240, 320),
    progress: bool = True,
    policy_name: str = "",
    reference_name: str | None = None,
    blending: str = "latest",
    cache: EpisodeCache | None = None,
) -> EvalReport:
    """Closed-loop episodes of `policy` on `seeds`, in order.

    cache: episodes already in it are taken from it, each new one is added as soon as it ends, so a stopped
    evaluation continues where it was (the caller keys the cache by everything that determines an episode).
    """
    from tqdm import tqdm

    from qvla_ros.sim.rig import SimRig

    t0 = time.time()
    results = []
    todo = seeds if cache is None else cache.missing(seeds)
    with SimRig(task=task, image_size=image_size, camera_names=tuple(policy.camera_names)) as rig:
        bar = tqdm(seeds, desc="eval", unit="ep", disable=not progress)
        for seed in bar:
            if seed not in todo:
                results.append(EpisodeResult(**cache.get(seed)))
            else:
                results.append(
                    run_episode(
                        rig,
                        policy,
                        seed,
                        steps=steps,
                        replan_every=replan_every,
                        reference=reference,
                        blending=blending,
                    )
                )
                if cache is not None:
                    cache.add(asdict(results[-1]))
            bar.set_postfix(success=f"{sum(r.success for r in results)}/{len(results)}")
    if reference is not None and not reference_name:
        reference_name = reference.model_id
    return EvalReport(policy_name or policy.model_id, reference_name, task, results, time.time() - t0)


def parse_seeds(text: str) -> list[int]:
    """ "1000-1049" or "1,2,5" -> list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            seeds.extend(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qvla-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy directory or qvla_quant artifact")
    p.add_argument("--reference", help="full-precision reference policy for the action deviation")
    p.add_argument("--seeds", default="1000-1049", help='e.g. "1000-1049" (held out from training seeds)')
    p.add_argument("--task", default="transfer_cube")
    p.add_argument("--steps", type=int, default=240, help="30 Hz command ticks per episode (240 = 8 s)")
    p.add_argument("--replan-every", type=int, default=10, help="command ticks between predictions")
    p.add_argument(
        "--blending",
        default="latest",
        choices=("latest", "temporal_ensemble", "weighted_overlap"),
        help="how overlapping chunks are played out (the policy node's scheduler)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        policy = PolicyRuntime.load(args.policy, device=args.device)
        reference = PolicyRuntime.load(args.reference, device=args.device) if args.reference else None
    except (ValueError, OSError, KeyError) as exc:  # PolicyFormatError, qvla_quant's ArtifactError, missing files
        print(f"qvla-eval: error: {one_line(exc)}", file=sys.stderr)
        return 2
    report = evaluate(
        policy,
        seeds,
        task=args.task,
        reference=reference,
        steps=args.steps,
        replan_every=args.replan_every,
        policy_name=args.policy,
        reference_name=args.reference,
        blending=args.blending,
    )
    print(json.dumps(report.summary(), indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
