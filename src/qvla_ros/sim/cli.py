"""`qvla-sim`: the simulated rig's command line (no ROS needed).

    qvla-sim record-demos --out demos -n 20            # 20 successful scripted demonstrations (episodes)
    qvla-sim expert-eval --seeds 50                     # the scripted teleoperator's success rate
    qvla-sim snapshot --out cams.png --seed 3           # the three camera images after reset, side by side

record-demos resumes: episodes already in --out keep their numbers and seeds, new ones continue after them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

EPISODE_PREFIX = "episode_"


def _image_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 240x320, got {text!r}")
    h, w = int(m.group(1)), int(m.group(2))
    if not (8 <= h <= 4096 and 8 <= w <= 4096):
        raise argparse.ArgumentTypeError(f"image size {h}x{w} out of range (8..4096 pixels per side)")
    return h, w


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonnegative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _cameras(text: str) -> tuple[str, ...]:
    from qvla_ros.sim.rig import CAMERAS

    names = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in names if c not in CAMERAS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown camera(s) {bad or text!r}; choose from {', '.join(CAMERAS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvla-sim", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("record-demos", help="record N successful scripted demonstrations as episodes")
    r.add_argument("--out", required=True, type=Path, help="output directory (created; existing episodes are kept)")
    r.add_argument("-n", "--episodes", type=_positive, default=10, help="successful episodes to add (default 10)")
    r.add_argument("--seed0", type=_nonnegative, default=0, help="first seed to try (default 0)")
    r.add_argument(
        "--max-attempts", type=_positive, default=None, help="give up after this many tries (default 2N + 10)"
    )
    r.add_argument("--image-size", type=_image_size, default=(240, 320), help="HEIGHTxWIDTH (default 240x320)")
    r.add_argument(
        "--command-mode",
        choices=("interpolate", "hold"),
        default="interpolate",
        help="how 30 Hz commands reach the 50 Hz physics (default interpolate)",
    )
    r.add_argument("--topics", type=Path, default=None, help="topic configuration (default config/topics.yaml)")
    r.add_argument("--no-compress", action="store_true", help="store MCAP chunks uncompressed")
    r.add_argument("--keep-failed", action="store_true", help="also keep failed episodes (marked success=false)")

    e = sub.add_parser("expert-eval", help="the scripted teleoperator's success rate over seeds (physics only)")
    e.add_argument("--seeds", type=_positive, default=50, help="number of seeds (default 50)")
    e.add_argument("--seed0", type=_nonnegative, default=0, help="first seed (default 0)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON line")

    s = sub.add_parser("snapshot", help="save the cameras' images after reset as one PNG")
    s.add_argument("--out", required=True, type=Path, help="PNG file to write")
    s.add_argument("--seed", type=_nonnegative, default=0)
    s.add_argument("--image-size", type=_image_size, default=(240, 320))
    s.add_argument(
        "--cameras",
        type=_cameras,
        default=("top", "left_wrist", "right_wrist"),
        help="comma-separated camera names (default top,left_wrist,right_wrist)",
    )
    return p


def _existing_episodes(out: Path) -> tuple[int, set[int]]:
    """(next episode index, seeds already recorded) for an output directory."""
    import yaml

    next_index, seeds = 0, set()
    for d in sorted(out.glob(f"{EPISODE_PREFIX}*")):
        m = re.fullmatch(rf"{EPISODE_PREFIX}(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        next_index = max(next_index, int(m.group(1)) + 1)
        try:
            info = yaml.safe_load((d / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
            seeds.add(int(json.loads(info["custom_data"]["qvla.metadata"])["seed"]))
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            pass  # an unfinished or foreign episode keeps its number; its seed may be retried
    return next_index, seeds


def cmd_record_demos(args) -> int:
    from tqdm import tqdm

    from qvla_ros.episodes.topics import load_topic_config
    from qvla_ros.sim.record import record_episode
    from qvla_ros.sim.rig import SimRig

    topics = load_topic_config(args.topics)
    args.out.mkdir(parents=True, exist_ok=True)
    index, done_seeds = _existing_episodes(args.out)
    max_attempts = args.max_attempts or 2 * args.episodes + 10
    kept = attempts = 0
    seed = args.seed0
    total_bytes = 0
    t0 = time.perf_counter()
    with SimRig(image_size=args.image_size, camera_names=topics.camera_names, command_mode=args.command_mode) as rig:
        bar = tqdm(total=args.episodes, unit="ep", desc="record-demos")
        while kept < args.episodes and attempts < max_attempts:
            if seed in done_seeds:
                seed += 1
                continue
            path = args.out / f"{EPISODE_PREFIX}{index:06d}"
            res = record_episode(
                path, seed, rig, topics=topics, keep_failed=args.keep_failed, compress=not args.no_compress
            )
            attempts += 1
            seed += 1
            if res.path is not None:
                index += 1
                total_bytes += res.bytes
            bar.set_postfix(
                tries=attempts, ok=f"{kept + res.success}/{attempts}", last=f"{res.wall_s:.1f}s", refresh=False
            )
            if res.success:
                kept += 1
                bar.update(1)
        bar.close()
    rate = kept / attempts if attempts else 0.0
    print(
        f"recorded {kept} successful episode(s) in {args.out} from {attempts} attempt(s) "
        f"(expert success {rate:.0%}), {total_bytes / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s"
    )
    if kept < args.episodes:
        print(
            f"qvla-sim: error: only {kept} of {args.episodes} episodes succeeded within {max_attempts} attempts; "
            "raise --max-attempts",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_expert_eval(args) -> int:
    from tqdm import tqdm

    from qvla_ros.sim.expert import evaluate_expert

    seeds = range(args.seed0, args.seed0 + args.seeds)
    bar = tqdm(total=args.seeds, unit="ep", desc="expert-eval", disable=args.json)
    ok = 0

    def progress(r):
        nonlocal ok
        ok += r.success
        bar.set_postfix(success=f"{ok}/{bar.n + 1}", refresh=False)
        bar.update(1)

    t0 = time.perf_counter()
    results = evaluate_expert(seeds, progress=progress)
    bar.close()
    failed = [r.seed for r in results if not r.success]
    summary = {
        "seeds": [args.seed0, args.seed0 + args.seeds - 1],
        "episodes": len(results),
        "success": sum(r.success for r in results),
        "success_rate": sum(r.success for r in results) / len(results),
        "success_at_end": sum(r.success_at_end for r in results),
        "failed_seeds": failed,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"scripted expert, transfer_cube, seeds {args.seed0}..{args.seed0 + args.seeds - 1}: "
            f"{summary['success']}/{summary['episodes']} successful ({summary['success_rate']:.0%}), "
            f"{summary['success_at_end']} still holding at the end; failed seeds: {failed or 'none'}"
        )
    return 0


def cmd_snapshot(args) -> int:
    import matplotlib.image
    import numpy as np

    from qvla_ros.sim.rig import SimRig

    with SimRig(image_size=args.image_size, camera_names=args.cameras) as rig:
        obs = rig.reset(seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(args.out, np.concatenate([obs.images[c] for c in args.cameras], axis=1))
    print(f"wrote {args.out} ({', '.join(args.cameras)}; seed {args.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qvla_ros.episodes.reader import EpisodeError
    from qvla_ros.episodes.topics import TopicConfigError
    from qvla_ros.paths import ConfigNotFoundError
    from qvla_ros.sim.rig import RigError

    handlers = {"record-demos": cmd_record_demos, "expert-eval": cmd_expert_eval, "snapshot": cmd_snapshot}
    try:
        return handlers[args.command](args)
    except (RigError, EpisodeError, TopicConfigError, ConfigNotFoundError, FileExistsError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the exception put in it
        print(f"qvla-sim: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qvla-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
